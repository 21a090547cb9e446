"""Model loading: specs, checkpoints (safetensors/.pth, wrappers, prefixes), errors, pretrained."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from binarize_cli.convert.pipeline import weights_provenance
from binarize_cli.core.errors import BadInputError, CheckpointError, UnknownModelError
from binarize_cli.load import models
from binarize_cli.load.models import (
    check_input_size,
    create_architecture,
    find_classifier,
    find_first_conv,
    load_model,
    load_state_dict_file,
    parse_spec,
    reset_classifier,
)


class NotAllowedInCheckpoints:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = 42


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    """A random timm resnet18 with a 10-class head (what a user's fine-tuned file looks like)."""
    torch.manual_seed(123)
    return _sd(create_architecture("resnet18", 10).model)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: str = "\0") -> None:
    keys = [k for k in a if not k.startswith(skip)]
    assert keys
    for k in keys:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- specs


def test_parse_spec_forms() -> None:
    assert parse_spec("resnet18") == models.ModelSpec("timm", "resnet18", None)
    assert parse_spec("timm:resnet18.a1_in1k") == models.ModelSpec("timm", "resnet18", "a1_in1k")
    assert parse_spec("torchvision:resnet18") == models.ModelSpec("torchvision", "resnet18", None)
    # not a timm name, but a torchvision one: the bare name falls through to torchvision
    assert parse_spec("mobilenet_v2").family == "torchvision"


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("resnt18", "resnet18"),
        ("torchvision:resnet181", "resnet18"),
        ("timm:efficientnet_b00", "efficientnet_b0"),
    ],
)
def test_unknown_model_suggests_close_names(spec: str, expect: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model(spec)
    msg = str(info.value)
    assert "did you mean" in msg and expect in msg
    assert "\n" not in msg
    assert info.value.exit_code == 2


def test_unknown_source_and_tags() -> None:
    with pytest.raises(UnknownModelError, match="timm:NAME or torchvision:NAME"):
        parse_spec("keras:resnet18")
    with pytest.raises(UnknownModelError, match="a1_in1k"):
        create_architecture("resnet18.no_such_tag")
    with pytest.raises(UnknownModelError, match="IMAGENET1K_V1"):
        create_architecture("torchvision:resnet18.NOPE")


def test_create_architecture_timm_fields() -> None:
    lm = create_architecture("resnet18", 10)
    assert lm.spec == "timm:resnet18" and lm.family == "timm" and lm.arch == "resnet18"
    assert lm.weights == "random" and lm.num_classes == 10 and not lm.classifier_reset
    assert lm.first_conv == "conv1" and lm.classifier == "fc"
    assert lm.input_size == (3, 224, 224)
    assert lm.mean == pytest.approx((0.485, 0.456, 0.406)) and len(lm.std) == 3
    assert lm.model.get_submodule("fc").out_features == 10
    tagged = create_architecture("timm:resnet18.tv_in1k")
    assert tagged.spec == "timm:resnet18.tv_in1k" and tagged.crop_pct == pytest.approx(0.875)
    assert tagged.num_classes == 1000


def test_create_architecture_torchvision_finds_modules() -> None:
    lm = create_architecture("torchvision:mobilenet_v3_small", 7)
    assert lm.spec == "torchvision:mobilenet_v3_small" and lm.family == "torchvision"
    # first conv and last Linear in execution order
    assert lm.first_conv == "features.0.0" and lm.classifier == "classifier.3"
    assert lm.num_classes == 7
    reset_classifier(lm, 3)
    head = lm.model.get_submodule("classifier.3")
    assert isinstance(head, nn.Linear) and head.out_features == 3 and lm.classifier_reset
    assert lm.model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_execution_order_beats_registration_order() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)  # registered first, runs last
            self.body = nn.Conv2d(4, 4, 1)
            self.stem = nn.Conv2d(3, 4, 3)  # registered last, runs first
            self.mid = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.body(self.stem(x)).mean((2, 3))
            return self.head(self.mid(x))

    m = Odd()
    x = torch.randn(1, 3, 8, 8)
    assert find_first_conv(m, x) == "stem" and find_classifier(m, x) == "head"
    # without an example: registration order
    assert find_first_conv(m) == "body" and find_classifier(m) == "mid"


# --------------------------------------------------------------------------- checkpoints


def test_load_safetensors_checkpoint(tmp_path: Path, r18_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(r18_state, str(path))
    lm = load_model("resnet18", checkpoint=path)
    assert lm.num_classes == 10  # read from the checkpoint's classifier
    assert lm.weights.startswith("checkpoint:") and len(lm.weights) == len("checkpoint:") + 12
    assert lm.source == str(path) and not lm.classifier_reset
    _same(lm.model.state_dict(), r18_state)


def test_load_pth_state_dict(tmp_path: Path, r18_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r18.pth"
    torch.save(r18_state, path)
    lm = load_model("timm:resnet18", checkpoint=str(path))
    _same(lm.model.state_dict(), r18_state)
    # the weights identity is a content hash: same bytes, same id; other bytes, other id
    again = load_model("resnet18", checkpoint=path)
    assert again.weights == lm.weights
    other = {k: v.clone() for k, v in r18_state.items()}
    other["fc.bias"] += 1
    torch.save(other, tmp_path / "other.pth")
    assert load_model("resnet18", checkpoint=tmp_path / "other.pth").weights != lm.weights


def test_wrapped_state_dict_with_module_prefix(
    tmp_path: Path, r18_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "ddp.pt"
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in r18_state.items()}}
    torch.save(wrapped, path)
    lm = load_model("resnet18", checkpoint=path)
    _same(lm.model.state_dict(), r18_state)
    sd = load_state_dict_file(path)
    assert set(sd) == set(r18_state)


def test_checkpoint_with_other_class_count_resets_only_the_classifier(
    tmp_path: Path, r18_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(r18_state, str(path))
    lm = load_model("resnet18", checkpoint=path, num_classes=4)
    assert lm.num_classes == 4 and lm.classifier_reset
    assert lm.model.get_submodule("fc").weight.shape == (4, 512)
    _same(lm.model.state_dict(), r18_state, skip="fc.")


def test_headless_checkpoint_gets_a_fresh_classifier(
    tmp_path: Path, r18_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in r18_state.items() if not k.startswith("fc.")}, str(path))
    lm = load_model("resnet18", checkpoint=path, num_classes=6)
    assert lm.classifier_reset and lm.num_classes == 6 and lm.notes
    _same(lm.model.state_dict(), r18_state, skip="fc.")


def test_torchvision_resnet18_checkpoint(tmp_path: Path) -> None:
    created = create_architecture("torchvision:resnet18", 10)
    assert created.first_conv == "conv1" and created.classifier == "fc"
    assert created.input_size == (3, 224, 224) and created.crop_pct == pytest.approx(224 / 256)
    state = _sd(created.model)
    torch.save(state, tmp_path / "tv.pth")
    lm = load_model("torchvision:resnet18", checkpoint=tmp_path / "tv.pth")
    assert lm.spec == "torchvision:resnet18" and lm.num_classes == 10
    _same(lm.model.state_dict(), state)


def test_wrong_architecture_names_the_first_keys(tmp_path: Path) -> None:
    torch.save(_sd(create_architecture("resnet34", 10).model), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", checkpoint=tmp_path / "r34.pth")
    msg = str(info.value)
    assert "unexpected layer1.2.conv1.weight" in msg and "more)" in msg
    assert "timm:resnet18" in msg and "\n" not in msg


def test_shape_mismatch_is_named(tmp_path: Path, r18_state: dict[str, torch.Tensor]) -> None:
    bad = dict(r18_state)
    bad["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch conv1\.weight \(64, 3, 5, 5\) vs \(64, 3, 7, 7\)"
    ):
        load_model("resnet18", checkpoint=tmp_path / "bad.safetensors")


def test_missing_keys_are_named(tmp_path: Path, r18_state: dict[str, torch.Tensor]) -> None:
    torch.save(
        {k: v for k, v in r18_state.items() if not k.startswith("layer4.")}, tmp_path / "part.pth"
    )
    with pytest.raises(CheckpointError, match=r"missing layer4\.0\.conv1\.weight"):
        load_model("resnet18", checkpoint=tmp_path / "part.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_checkpoint(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"\x13\x37 this is not a checkpoint " * 10)
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", checkpoint=path)
    assert "cannot read" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint(
    tmp_path: Path, r18_state: dict[str, torch.Tensor], suffix: str
) -> None:
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save(r18_state, path)
    else:
        save_file(r18_state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model("resnet18", checkpoint=path)


def test_pickle_with_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotAllowedInCheckpoints()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", checkpoint=path)
    msg = str(info.value)
    assert (
        "refused to unpickle" in msg and "NotAllowedInCheckpoints" in msg and "weights_only" in msg
    )


def test_non_tensor_entries_and_missing_files(tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="'note' is a str"):
        load_model("resnet18", checkpoint=tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("resnet18", checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        load_model("resnet18", checkpoint=tmp_path)
    with pytest.raises(BadInputError):
        load_model("resnet18", num_classes=0)


# --------------------------------------------------------------------------- pretrained


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_pretrained_offline_fails_fast_with_hf_offline(empty_caches: Path) -> None:
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", pretrained=True)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "--checkpoint" in msg and "timm:resnet18.a1_in1k" in msg and "HF_HUB_OFFLINE" in msg
    # it says where it looked: the Hugging Face cache and torch hub's (timm's url fallback)
    assert (
        f"searched {empty_caches / 'hf'}, {empty_caches / 'torch' / 'hub' / 'checkpoints'}" in msg
    )
    assert len(msg.splitlines()) == 1


def test_pretrained_unreachable_hub_fails_fast(
    empty_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probed: list[str] = []

    def unreachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
        probed.append(host)
        return False

    monkeypatch.setattr(models, "_reachable", unreachable)
    for spec, host in [
        ("resnet18", "huggingface.co"),
        ("torchvision:resnet18", "download.pytorch.org"),
    ]:
        with pytest.raises(CheckpointError, match="unreachable.*--checkpoint") as info:
            load_model(spec, pretrained=True)
        assert probed[-1] == host
        assert str(empty_caches / "torch" / "hub" / "checkpoints") in str(info.value)


def test_reachable_probe_gives_up_within_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    assert models._reachable("192.0.2.1", 443, timeout=0.5) is False  # TEST-NET-1: never routed
    assert time.monotonic() - start < 2.0


def _populate_hf_cache(
    cache: Path, repo: str, filename: str, state: dict[str, torch.Tensor]
) -> Path:
    """The Hugging Face hub cache layout: refs/main -> snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(state, str(snap / filename))
    return snap / filename


def test_timm_pretrained_from_the_local_hub_cache(empty_caches: Path) -> None:
    torch.manual_seed(7)
    state = _sd(create_architecture("resnet18").model)  # 1000 classes like the hub file
    file = _populate_hf_cache(
        empty_caches / "hf", "timm/resnet18.a1_in1k", "model.safetensors", state
    )
    lm = load_model("resnet18", pretrained=True)
    assert lm.weights == "pretrained" and lm.spec == "timm:resnet18.a1_in1k" and lm.tag == "a1_in1k"
    # the run records the cached file and its hash
    assert weights_provenance(lm) == (
        str(file.resolve()),
        hashlib.sha256(file.read_bytes()).hexdigest(),
    )
    assert lm.source == str(file) and lm.num_classes == 1000 and not lm.classifier_reset
    assert lm.crop_pct == pytest.approx(0.95) and lm.interpolation == "bicubic"
    _same(lm.model.state_dict(), state)
    # another class count: timm's own pretrained path drops the classifier, keeps the rest
    lm10 = load_model("timm:resnet18.a1_in1k", pretrained=True, num_classes=10)
    assert lm10.classifier_reset and lm10.model.get_submodule("fc").out_features == 10
    _same(lm10.model.state_dict(), state, skip="fc.")


def test_timm_pretrained_cfg_overlay_file_directly(tmp_path: Path) -> None:
    """The timm mechanism the cache path relies on: pretrained_cfg_overlay=dict(file=...)."""
    import timm

    torch.manual_seed(3)
    state = _sd(create_architecture("resnet18").model)
    torch.save(state, tmp_path / "weights.pth")
    model = timm.create_model(
        "resnet18",
        pretrained=True,
        num_classes=5,
        pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")},
    )
    _same(model.state_dict(), state, skip="fc.")
    assert model.fc.out_features == 5


def test_torchvision_pretrained_from_the_torch_hub_cache(empty_caches: Path) -> None:
    import torchvision

    torch.manual_seed(5)
    state = _sd(create_architecture("torchvision:resnet18").model)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    ckpt_dir = empty_caches / "torch" / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(state, ckpt_dir / Path(url).name)
    lm = load_model("torchvision:resnet18", pretrained=True, num_classes=10)
    assert lm.weights == "pretrained" and lm.spec == "torchvision:resnet18.IMAGENET1K_V1"
    assert lm.classifier_reset and lm.num_classes == 10
    _same(lm.model.state_dict(), state, skip="fc.")


def test_checkpoint_wins_over_pretrained(
    tmp_path: Path, empty_caches: Path, r18_state: dict[str, torch.Tensor]
) -> None:
    save_file(r18_state, str(tmp_path / "mine.safetensors"))
    lm = load_model("resnet18", pretrained=True, checkpoint=tmp_path / "mine.safetensors")
    assert lm.weights.startswith("checkpoint:")


def test_canonical_specs_load_back() -> None:
    for spec in ("timm:resnet18", "timm:resnet18.a1_in1k", "torchvision:resnet18"):
        assert create_architecture(spec, 3).spec == spec


@pytest.mark.parametrize("kind", ["corrupt", "mismatched"])
def test_cli_convert_reports_a_bad_checkpoint_in_one_line(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    r18_state,
) -> None:
    from binarize_cli.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BINARIZE_DEBUG", raising=False)
    path = tmp_path / "ckpt.safetensors"
    if kind == "corrupt":
        path.write_bytes(b"\0" * 64)
        model, expect = "resnet18", "cannot read"
    else:
        save_file(r18_state, str(path))  # resnet18 weights for a resnet34
        model, expect = "resnet34", "missing layer1.2.conv1.weight"
    with pytest.raises(SystemExit) as info:
        main(["convert", model, "--checkpoint", str(path), "--data", "fake"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("binarize: error:") and expect in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("runs/*/binarize.json"))  # no partial output


# --------------------------------------------------------------------------- input size


def test_inception_at_32x32_names_its_minimum_input_size() -> None:
    """inception_v3 cannot run at 32x32 (a 3x3 kernel meets a 1x1 map): one line naming 75."""
    import timm

    with torch.device("meta"):  # the architecture only: built in a fraction of a second
        model = timm.create_model("inception_v3", num_classes=10)
    start = time.monotonic()
    with pytest.raises(BadInputError) as info:
        check_input_size(model, (3, 32, 32), name="timm:inception_v3", default_size=(3, 299, 299))
    assert str(info.value) == (
        "timm:inception_v3 needs inputs of at least 75x75, got 32x32; "
        "pass --input-size 75 or larger"
    )
    check_input_size(model, (3, 75, 75), name="timm:inception_v3", default_size=(3, 299, 299))
    assert time.monotonic() - start < 10


def test_check_input_size_on_a_real_model_leaves_it_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.ReLU(), nn.Conv2d(4, 4, 7), nn.Flatten())
    before = _sd(model)
    with pytest.raises(BadInputError, match="at least 13x13, got 8x8; pass --input-size 13"):
        check_input_size(model, (3, 8, 8), name="net", default_size=(3, 32, 32))
    check_input_size(model, (3, 13, 13), name="net", default_size=(3, 32, 32))
    assert all(p.device.type == "cpu" for p in model.parameters()) and model.training
    _same(model.state_dict(), before)
    # without a size it runs at, the failure is not about the size: nothing is raised here
    check_input_size(model, (3, 8, 8), name="net", default_size=(3, 10, 10))
