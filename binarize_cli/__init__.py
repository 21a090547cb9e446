"""binarize: post-convert pretrained image CNNs into multiple-binary networks (ABC-Net, PA-Net)."""

__version__ = "0.1.0"
