"""``MODULE:CLASS`` model specs: a user's own nn.Module class, imported, built, loaded."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from binarize_cli.core.errors import BadInputError, CheckpointError, UnknownModelError
from binarize_cli.load.models import (
    ModelSpec,
    class_source_digest,
    create_architecture,
    is_class_spec,
    load_model,
    parse_spec,
)

SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            x = torch.relu(self.body(torch.relu(self.stem(x))))
            return self.head(x.mean((2, 3)))


    class Fixed(nn.Module):
        # no num_classes parameter; the classifier registered first but run last
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 5)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.extra = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.extra(self.stem(x).mean((2, 3))))


    class Zoo:
        Net = Net


    class NeedsArgs(nn.Module):
        def __init__(self, width):
            super().__init__()


    def helper():
        return 1
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> str:
    """A module of model classes in the (temporary) current directory; its name."""
    name = f"usernets_{request.node.name.split('[')[0]}"
    (tmp_path / f"{name}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_class_spec_form() -> None:
    assert is_class_spec("mymodels:TinyNet") and is_class_spec("pkg.sub:Zoo.Net")
    for not_one in ("resnet18", "timm:resnet18", "torchvision:resnet18", "a:1b", "a:", ":B"):
        assert not is_class_spec(not_one), not_one


def test_parse_and_build_from_the_current_directory(user_module: str) -> None:
    before = list(sys.path)
    spec = f"{user_module}:Net"
    assert parse_spec(spec) == ModelSpec("python", spec)
    loaded = create_architecture(spec, num_classes=3)
    assert sys.path == before  # the current directory was on the path only while importing
    assert (loaded.spec, loaded.family, loaded.weights) == (spec, "python", "random")
    assert loaded.num_classes == 3 and loaded.model.head.out_features == 3
    assert (loaded.first_conv, loaded.classifier) == ("stem", "head")
    assert loaded.input_size == (3, 224, 224) and loaded.mean == (0.485, 0.456, 0.406)
    assert create_architecture(f"{user_module}:Zoo.Net").num_classes == 10  # dotted CLASS


def test_a_class_without_num_classes_gets_its_classifier_replaced(user_module: str) -> None:
    spec = f"{user_module}:Fixed"
    assert create_architecture(spec).num_classes == 5
    loaded = create_architecture(spec, num_classes=7)
    assert loaded.classifier == "head"  # the last Linear *run*, not the last registered
    assert loaded.model.head.out_features == 7 and loaded.model.extra.out_features == 8


def test_checkpoints_of_a_user_class(user_module: str, tmp_path: Path) -> None:
    spec = f"{user_module}:Net"
    source = create_architecture(spec, num_classes=10).model
    state = source.state_dict()
    torch.save(state, tmp_path / "net.pt")
    save_file(state, str(tmp_path / "net.safetensors"))
    for name in ("net.pt", "net.safetensors"):
        loaded = load_model(spec, checkpoint=tmp_path / name)
        assert loaded.weights.startswith("checkpoint:") and loaded.num_classes == 10
        assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    other = load_model(spec, checkpoint=tmp_path / "net.pt", num_classes=4)
    assert other.classifier_reset and other.model.head.out_features == 4
    assert torch.equal(other.model.body.weight, state["body.weight"])
    with pytest.raises(CheckpointError, match="without hub weights"):
        load_model(spec, pretrained=True)


@pytest.mark.parametrize(
    ("cls", "error", "match"),
    [
        ("Missing", UnknownModelError, "has no class 'Missing'"),
        ("helper", UnknownModelError, "not an nn.Module subclass"),
        ("NeedsArgs", BadInputError, "must build without other arguments"),
    ],
)
def test_bad_classes(user_module: str, cls: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        create_architecture(f"{user_module}:{cls}")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_unimportable_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownModelError, match="cannot import module 'no_such_module_x'"):
        parse_spec("no_such_module_x:Net")
    (tmp_path / "broken_user_module.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.delitem(sys.modules, "broken_user_module", raising=False)
    with pytest.raises(UnknownModelError, match="RuntimeError: boom"):
        parse_spec("broken_user_module:Net")


def test_baseline_cache_key_follows_the_class_source(user_module: str, tmp_path: Path) -> None:
    """An edited class file changes the baseline cache key (no stale cached baseline)."""
    from binarize_cli.convert.baseline import baseline_key
    from binarize_cli.load.data import load_data

    spec = f"{user_module}:Net"
    data = load_data("fake")
    loaded = create_architecture(spec, num_classes=10)
    kwargs = {"train": True, "epochs": 1, "batch_size": 8, "lr": 1e-3, "seed": 0}
    key, fields = baseline_key(loaded, data, **kwargs)
    assert fields["source_sha256"] == class_source_digest(spec) != ""
    (tmp_path / f"{user_module}.py").write_text(SOURCE + "\n# edited\n")
    assert baseline_key(loaded, data, **kwargs)[0] != key
