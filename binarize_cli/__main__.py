"""`python -m binarize_cli` (and `torchrun ... -m binarize_cli`) runs the CLI."""

from binarize_cli.cli import main

if __name__ == "__main__":
    main()
