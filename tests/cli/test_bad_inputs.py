"""Bad input through the CLI: exit code 2, one line on stderr, no traceback, nothing written.

Every case runs ``binarize_cli.cli.main`` (the console-script entry point) in a scratch
working directory and checks, besides the exit code and the single ``binarize: error:`` line,
that no file appeared or changed anywhere the command could write: the working directory,
the inputs, a shared run directory and the baseline cache (``$BINARIZE_CACHE``). Most cases
fail before anything is loaded; a few load a tiny timm model (``test_resnet``).

``test_bad_input_in_a_fresh_process`` repeats a few cases with ``python -m binarize_cli`` to
show that a real process prints no warnings or traceback either; the full sweep in fresh
processes is ``-m slow``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from binarize_cli.cli import main

SMALL = "timm:test_resnet"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, make_run_dir) -> dict[str, Path]:
    """Inputs shared by the cases (built once): a run, checkpoints, recipes, data folders."""
    import timm
    from safetensors.torch import save_file

    from binarize_cli.runtime.format import FORMAT_NAME

    root = tmp_path_factory.mktemp("bad-inputs")
    p: dict[str, Path] = {"root": root}
    p["run"] = make_run_dir(root / "run", data="fake")  # a loadable run (random weights)

    model = timm.create_model("test_resnet", num_classes=10)
    state = model.state_dict()
    p["ckpt"] = root / "test_resnet.pt"
    torch.save(state, p["ckpt"])
    blob = p["ckpt"].read_bytes()
    p["ckpt_truncated"] = root / "truncated.pt"
    p["ckpt_truncated"].write_bytes(blob[: len(blob) // 2])
    p["ckpt_garbage"] = root / "garbage.pt"
    p["ckpt_garbage"].write_bytes(b"this is not a checkpoint\n" * 20)
    p["st_truncated"] = root / "truncated.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "full.safetensors"))
    p["st_truncated"].write_bytes((root / "full.safetensors").read_bytes()[:999])
    p["ckpt_pickle"] = root / "pickled.pt"
    torch.save({"model": model}, p["ckpt_pickle"])  # a whole module: weights_only refuses it

    recipes = {
        "recipe_unknown": 'model = "test_resnet"\nscheme = "pa"\nlearning_rate = 0.1\n',
        "recipe_type": 'model = "test_resnet"\nM = "four"\n',
        "recipe_toml": 'model = "test_resnet\nM = 4\n',
        "recipe_option": 'model = "test_resnet"\n[scheme_options]\nlambda_q = 1.0\n',
        "recipe_bool": 'model = "test_resnet"\nepochs = true\n',
        "recipe_device": 'model = "test_resnet"\ndevice = 0\n',
    }
    for name, text in recipes.items():
        p[name] = root / f"{name}.toml"
        p[name].write_text(text)

    # Image folders: no train/ at all; a class folder without images; an empty directory.
    flat = root / "flat"
    (flat / "cat").mkdir(parents=True)
    _png(flat / "cat" / "a.png")
    p["if_flat"] = flat
    empty_class = root / "empty_class"
    for split in ("train", "val"):
        (empty_class / split / "cat").mkdir(parents=True)
        _png(empty_class / split / "cat" / "a.png")
    (empty_class / "train" / "dog").mkdir()
    p["if_empty_class"] = empty_class
    p["empty_dir"] = root / "empty"
    p["empty_dir"].mkdir()

    # Packed files: another format version, another format, truncated.
    tensors = {"w": torch.zeros(4, dtype=torch.uint8)}
    p["packed_v99"] = root / "v99.safetensors"
    save_file(
        tensors, str(p["packed_v99"]), metadata={"format": FORMAT_NAME, "format_version": "99"}
    )
    p["packed_foreign"] = root / "foreign.safetensors"
    save_file(tensors, str(p["packed_foreign"]), metadata={"format": "something-else"})
    p["packed_truncated"] = root / "truncated.packed.safetensors"
    p["packed_truncated"].write_bytes(p["packed_v99"].read_bytes()[:20])

    # A run whose binarize.json is broken, and one whose weights are truncated.
    p["run_bad_json"] = root / "run_bad_json"
    shutil.copytree(p["run"], p["run_bad_json"])
    (p["run_bad_json"] / "binarize.json").write_text('{"model": ')
    p["run_truncated"] = root / "run_truncated"
    shutil.copytree(p["run"], p["run_truncated"])
    weights = p["run_truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])

    p["not_a_run"] = root / "not_a_run"
    p["not_a_run"].mkdir()
    (p["not_a_run"] / "notes.txt").write_text("keep me\n")
    return p


def _png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------- the checks


def _snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and directory under ``roots``: (size, mtime_ns, sha256) or a directory mark."""
    out: dict[str, tuple[int, int, str]] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirnames, filenames in os.walk(root):
            out[dirpath] = (0, 0, "dir")
            for name in filenames:
                f = Path(dirpath) / name
                st = f.stat()
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                out[str(f)] = (st.st_size, st.st_mtime_ns, digest)
    return out


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return Outcome(exc.value.code, captured.out, captured.err)


def _assert_bad_input(outcome: Outcome, expect: tuple[str, ...]) -> str:
    lines = outcome.stderr.strip().splitlines()
    assert outcome.code == 2, outcome
    assert len(lines) == 1, outcome.stderr
    line = lines[0]
    assert line.startswith("binarize: error: "), line
    assert "Traceback" not in outcome.stderr and "BINARIZE_DEBUG" not in line, line
    for needle in expect:
        assert needle.lower() in line.lower(), (needle, line)
    return line


# --------------------------------------------------------------------------- the cases

#: (id, argv builder from the shared paths, substrings the error line must contain)
Case = tuple[str, Callable[[dict[str, Path]], list[str]], tuple[str, ...]]

FAST = ["--data", "fake", "--epochs", "1", "--baseline-epochs", "1", "--batch-size", "32"]

CASES: list[Case] = [
    # models
    ("unknown-model", lambda p: ["convert", "resnt18", *FAST], ("resnt18", "resnet18")),
    (
        "unknown-torchvision-model",
        lambda p: ["convert", "torchvision:resnet1", *FAST],
        ("resnet1", "did you mean"),
    ),
    ("unknown-model-source", lambda p: ["convert", "keras:resnet18", *FAST], ("keras",)),
    # where and how it runs (--device, --workers, --amp)
    ("device-unknown", lambda p: ["convert", SMALL, *FAST, "--device", "tpu"], ("--device", "tpu")),
    ("device-cpu-index", lambda p: ["convert", SMALL, *FAST, "--device", "cpu:1"], ("cpu:1",)),
    # no CUDA here, or fewer than 100 GPUs there: refused either way
    ("device-cuda-index", lambda p: ["convert", SMALL, *FAST, "--device", "cuda:99"], ("cuda:99",)),
    ("workers-negative", lambda p: ["convert", SMALL, *FAST, "--workers", "-1"], ("--workers",)),
    ("amp-unknown", lambda p: ["convert", SMALL, *FAST, "--amp", "int8"], ("--amp", "bf16")),
    # --distill: a mode, and not contradicted by --no-distill
    (
        "distill-unknown",
        lambda p: ["convert", SMALL, *FAST, "--distill", "soft"],
        ("distill", "attention"),
    ),
    (
        "distill-contradicted",
        lambda p: ["convert", SMALL, *FAST, "--distill", "attention", "--no-distill"],
        ("--no-distill", "--distill attention"),
    ),
    (
        "amp-fp16-on-cpu",
        lambda p: ["convert", SMALL, *FAST, "--device", "cpu", "--amp", "fp16"],
        ("fp16", "cuda", "bf16"),
    ),
    (
        "recipe-device-type",
        lambda p: ["convert", "--recipe", str(p["recipe_device"])],
        ("device must be str",),
    ),
    # checkpoints
    (
        "checkpoint-missing",
        lambda p: ["convert", SMALL, "--checkpoint", str(p["root"] / "nope.pt"), *FAST],
        ("does not exist",),
    ),
    (
        "checkpoint-is-a-directory",
        lambda p: ["convert", SMALL, "--checkpoint", str(p["empty_dir"]), *FAST],
        ("not a file",),
    ),
    (
        "checkpoint-truncated",
        lambda p: ["convert", SMALL, "--checkpoint", str(p["ckpt_truncated"]), *FAST],
        ("truncated", "truncated.pt"),
    ),
    (
        "checkpoint-corrupt",
        lambda p: ["convert", SMALL, "--checkpoint", str(p["ckpt_garbage"]), *FAST],
        ("garbage.pt", "not a PyTorch checkpoint"),
    ),
    (
        "safetensors-truncated",
        lambda p: ["convert", SMALL, "--checkpoint", str(p["st_truncated"]), *FAST],
        ("truncated.safetensors",),
    ),
    (
        "checkpoint-other-architecture",
        lambda p: ["convert", "resnet18", "--checkpoint", str(p["ckpt"]), *FAST],
        ("does not fit", "conv1."),
    ),
    (
        "checkpoint-pickle-refused",
        lambda p: ["convert", SMALL, "--checkpoint", str(p["ckpt_pickle"]), *FAST],
        ("weights_only", "state_dict"),
    ),
    # schemes and M/N
    ("pa-odd-m", lambda p: ["convert", SMALL, "--scheme", "pa", "-M", "3", *FAST], ("even",)),
    ("pa-m-too-large", lambda p: ["convert", SMALL, "--scheme", "pa", "-M", "66", *FAST], ("66",)),
    ("m-below-1", lambda p: ["convert", SMALL, "--scheme", "abc", "-M", "0", *FAST], ("-M",)),
    ("n-below-0", lambda p: ["convert", SMALL, "--scheme", "pa", "-N", "-1", *FAST], ("-N",)),
    (
        "unknown-scheme",
        lambda p: ["convert", SMALL, "--scheme", "ternary", *FAST],
        ("ternary", "pa"),
    ),
    (
        "weight-endpoints-wrong-count",
        lambda p: ["convert", SMALL, "-M", "4", "--weight-endpoints", "-1,1", *FAST],
        ("weight_endpoints",),
    ),
    ("keep-bad-regex", lambda p: ["convert", SMALL, "--keep", "layer[", *FAST], ("--keep",)),
    # refused after the model loads, before the baseline trains (the cache stays untouched)
    (
        "keep-matches-no-layer",
        lambda p: ["convert", SMALL, "--keep", "layer9", *FAST],
        ("--keep 'layer9' matches no layer", "conv1"),
    ),
    (
        "pretrained-and-checkpoint",
        lambda p: ["convert", SMALL, "--pretrained", "--checkpoint", str(p["ckpt"]), *FAST],
        ("--pretrained", "--checkpoint", "one of them"),
    ),
    (
        "input-size-below-the-model-minimum",
        lambda p: ["convert", "timm:test_convnext", *FAST, "--input-size", "16"],
        ("test_convnext needs inputs of at least 32x32, got 16x16", "--input-size 32"),
    ),
    # numbers
    ("epochs-negative", lambda p: ["convert", SMALL, *FAST, "--epochs", "-1"], ("--epochs",)),
    ("lr-zero", lambda p: ["convert", SMALL, *FAST, "--lr", "0"], ("--lr",)),
    ("lr-nan", lambda p: ["convert", SMALL, *FAST, "--lr", "nan"], ("--lr",)),
    ("batch-size-zero", lambda p: ["convert", SMALL, *FAST, "--batch-size", "0"], ("batch",)),
    (
        "baseline-epochs-negative",
        lambda p: ["convert", SMALL, *FAST, "--baseline-epochs", "-2"],
        ("--baseline-epochs",),
    ),
    ("input-size-zero", lambda p: ["convert", SMALL, *FAST, "--input-size", "0"], ("input",)),
    ("not-a-number", lambda p: ["convert", SMALL, "-M", "four"], ("-M", "integer")),
    ("no-model", lambda p: ["convert", *FAST], ("model",)),
    # data
    ("unknown-data-spec", lambda p: ["convert", SMALL, "--data", "mnist"], ("mnist", "digits")),
    (
        "imagefolder-missing",
        lambda p: ["convert", SMALL, "--data", f"imagefolder:{p['root'] / 'nope'}"],
        ("does not exist",),
    ),
    (
        "imagefolder-wrong-layout",
        lambda p: ["convert", SMALL, "--data", f"imagefolder:{p['if_flat']}"],
        ("train/",),
    ),
    (
        "imagefolder-empty-class",
        lambda p: ["convert", SMALL, "--data", f"imagefolder:{p['if_empty_class']}"],
        ("dog",),
    ),
    (
        "fashion-mnist-missing-files",
        lambda p: ["convert", SMALL, "--data", f"fashion-mnist:{p['empty_dir']}"],
        ("train-images",),
    ),
    (
        "cifar10-missing-batches",
        lambda p: ["convert", SMALL, "--data", f"cifar10:{p['empty_dir']}"],
        ("data_batch_1",),
    ),
    # recipes
    (
        "recipe-unknown-key",
        lambda p: ["convert", "--recipe", str(p["recipe_unknown"])],
        ("learning_rate",),
    ),
    ("recipe-wrong-type", lambda p: ["convert", "--recipe", str(p["recipe_type"])], ("M must",)),
    (
        "recipe-bool-for-number",
        lambda p: ["convert", "--recipe", str(p["recipe_bool"])],
        ("epochs",),
    ),
    ("recipe-not-toml", lambda p: ["convert", "--recipe", str(p["recipe_toml"])], ("TOML",)),
    (
        "recipe-unknown-scheme-option",
        lambda p: ["convert", "--recipe", str(p["recipe_option"])],
        ("lambda_q",),
    ),
    (
        "recipe-missing",
        lambda p: ["convert", "--recipe", str(p["root"] / "nope.toml")],
        ("does not exist",),
    ),
    # convert output
    (
        "output-foreign-directory",
        lambda p: ["convert", SMALL, *FAST, "-o", str(p["not_a_run"])],
        ("not a binarize run",),
    ),
    (
        "output-is-a-file",
        lambda p: ["convert", SMALL, *FAST, "-o", str(p["not_a_run"] / "notes.txt")],
        ("not a directory",),
    ),
    # report
    ("report-not-a-run", lambda p: ["report", str(p["not_a_run"])], ("not a binarize run",)),
    ("report-no-runs", lambda p: ["report"], ("no run found",)),
    ("report-missing-dir", lambda p: ["report", str(p["root"] / "nope")], ("does not exist",)),
    ("report-broken-json", lambda p: ["report", str(p["run_bad_json"])], ("binarize.json",)),
    (
        "report-truncated-weights",
        lambda p: ["report", str(p["run_truncated"])],
        ("model.safetensors",),
    ),
    (
        "report-compare-not-a-run",
        lambda p: ["report", str(p["run"]), "--compare", str(p["not_a_run"])],
        ("not a binarize run",),
    ),
    ("report-unknown-model", lambda p: ["report", "resnt18"], ("resnet18",)),
    (
        "report-plot-into-a-file",
        lambda p: ["report", str(p["run"]), "--plot", str(p["not_a_run"] / "notes.txt")],
        ("--plot",),
    ),
    (
        "report-run-with-model-flags",
        lambda p: ["report", str(p["run"]), "-M", "4"],
        ("-M",),
    ),
    # export
    (
        "export-not-a-run",
        lambda p: ["export", str(p["not_a_run"]), "--target", "packed"],
        ("not a binarize run",),
    ),
    ("export-no-runs", lambda p: ["export", "--target", "onnx"], ("no run found",)),
    (
        "export-unknown-target",
        lambda p: ["export", str(p["run"]), "--target", "tflite"],
        ("tflite",),
    ),
    (
        "export-missing-directory",
        lambda p: ["export", str(p["run"]), "-o", str(p["root"] / "nope" / "m.onnx")],
        ("does not exist",),
    ),
    (
        "export-under-a-file",
        lambda p: [
            "export",
            str(p["run"]),
            "--target",
            "packed",
            "-o",
            str(p["not_a_run"] / "notes.txt" / "m.safetensors"),
        ],
        ("not a directory",),
    ),
    (
        "export-broken-run",
        lambda p: ["export", str(p["run_truncated"]), "--target", "packed", "-o", "x.st"],
        ("model.safetensors",),
    ),
    # verify and run
    ("verify-not-a-run", lambda p: ["verify", str(p["not_a_run"])], ("not a binarize run",)),
    (
        "run-missing-file",
        lambda p: ["run", str(p["root"] / "nope.safetensors"), "--data", "fake"],
        ("does not exist",),
    ),
    (
        "run-other-format-version",
        lambda p: ["run", str(p["packed_v99"]), "--data", "fake"],
        ("version", "99"),
    ),
    (
        "run-other-format",
        lambda p: ["run", str(p["packed_foreign"]), "--data", "fake"],
        ("not a binarize packed file",),
    ),
    (
        "run-truncated-packed-file",
        lambda p: ["run", str(p["packed_truncated"]), "--data", "fake"],
        ("truncated.packed.safetensors",),
    ),
]

#: Linux refuses to create files in /proc, even for root: an unwritable location everywhere.
UNWRITABLE = Path("/proc")
_needs_proc = pytest.mark.skipif(
    not (UNWRITABLE / "self").exists(), reason="needs Linux /proc as an unwritable location"
)

UNWRITABLE_CASES: list[Case] = [
    (
        "convert-output-unwritable",
        lambda p: ["convert", SMALL, *FAST, "-o", str(UNWRITABLE / "run")],
        ("cannot write", "-o"),
    ),
    (
        "export-onnx-unwritable",
        lambda p: ["export", str(p["run"]), "--target", "onnx", "-o", str(UNWRITABLE / "m.onnx")],
        ("cannot write", "-o"),
    ),
    (
        "export-packed-unwritable",
        lambda p: ["export", str(p["run"]), "--target", "packed", "-o", str(UNWRITABLE / "m.st")],
        ("cannot write", "-o"),
    ),
    (
        "report-plot-unwritable",
        lambda p: ["report", str(p["run"]), "--plot", str(UNWRITABLE / "figures")],
        ("cannot write", "--plot"),
    ),
]


def _check_case(
    build: Callable[[dict[str, Path]], list[str]],
    expect: tuple[str, ...],
    shared: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    cache = Path(os.environ["BINARIZE_CACHE"])
    before = _snapshot(work, shared["root"], cache)
    line = _assert_bad_input(_run_cli(build(shared), capsys), expect)
    assert _snapshot(work, shared["root"], cache) == before, f"files changed: {line}"
    return line


@pytest.mark.parametrize(("build", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(build, expect, shared, tmp_path, monkeypatch, capsys):
    _check_case(build, expect, shared, tmp_path, monkeypatch, capsys)


@_needs_proc
@pytest.mark.parametrize(
    ("build", "expect"), [c[1:] for c in UNWRITABLE_CASES], ids=[c[0] for c in UNWRITABLE_CASES]
)
def test_unwritable_output(build, expect, shared, tmp_path, monkeypatch, capsys):
    _check_case(build, expect, shared, tmp_path, monkeypatch, capsys)


def test_at_least_25_distinct_cases():
    ids = [c[0] for c in CASES + UNWRITABLE_CASES]
    assert len(ids) == len(set(ids)) >= 25


def test_cuda_without_cuda_is_refused(shared, tmp_path, monkeypatch, capsys):
    """``--device cuda`` where torch sees no CUDA: one line, exit 2, nothing written (torch's
    answer is faked, so the case runs the same on a machine with a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _check_case(
        lambda p: ["convert", SMALL, *FAST, "--device", "cuda"],
        ("--device cuda", "--device cpu"),
        shared,
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "cuda" in line.lower()


# --------------------------------------------------------------------------- resume input


def _fake_checkpoint(work_dir: Path, settings: dict[str, Any]) -> Path:
    from binarize_cli.convert.finetune import CHECKPOINT_FILE

    work_dir.mkdir(parents=True)
    path = work_dir / CHECKPOINT_FILE
    torch.save(
        {
            "model": {},
            "optimizer": {},
            "scheduler": {},
            "epochs_done": 1,
            "epoch_seconds": [1.0],
            "epoch_stats": [],
            "extra": {
                "calibrated": {"top1": 1.0, "top5": 5.0},
                "calibrate_s": 0.1,
                "settings": settings,
            },
        },
        path,
    )
    return path


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    from binarize_cli.convert.pipeline import resume_fingerprint, work_dir_for
    from binarize_cli.core.settings import merge_settings

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    old = merge_settings(None, {"model": SMALL, "scheme": "abc", "data": "fake"})
    _fake_checkpoint(work_dir_for(out), resume_fingerprint(old, "abc", 2, 2))
    before = _snapshot(tmp_path)
    args = ["convert", SMALL, "--scheme", "pa", *FAST, "-o", str(out), "--resume"]
    line = _assert_bad_input(_run_cli(args, capsys), ("scheme='abc'", "--resume"))
    assert "now 'pa'" in line
    assert _snapshot(tmp_path) == before


def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    from binarize_cli.convert.finetune import CHECKPOINT_FILE
    from binarize_cli.convert.pipeline import work_dir_for

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    work = work_dir_for(out)
    work.mkdir()
    (work / CHECKPOINT_FILE).write_bytes(b"\x80\x02garbage")
    before = _snapshot(tmp_path)
    args = ["convert", SMALL, *FAST, "-o", str(out), "--resume"]
    _assert_bad_input(_run_cli(args, capsys), ("unreadable", "without --resume"))
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- fresh processes


def _check_in_subprocess(
    case: Case, shared: dict[str, Path], tmp_path: Path, binarize_process
) -> None:
    _id, build, expect = case
    work = tmp_path / "cwd"
    work.mkdir()
    cache = Path(os.environ["BINARIZE_CACHE"])
    before = _snapshot(work, shared["root"], cache)
    # PYTHONWARNINGS: warnings would show up as extra lines
    proc = binarize_process(*build(shared), cwd=work, env={"PYTHONWARNINGS": "default"})
    _assert_bad_input(Outcome(proc.returncode, proc.stdout, proc.stderr), expect)
    assert _snapshot(work, shared["root"], cache) == before


_QUICK = ("unknown-scheme", "recipe-unknown-key", "report-not-a-run")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in _QUICK], ids=list(_QUICK))
def test_bad_input_in_a_fresh_process(case, shared, tmp_path, binarize_process):
    _check_in_subprocess(case, shared, tmp_path, binarize_process)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", CASES + UNWRITABLE_CASES, ids=[c[0] for c in CASES + UNWRITABLE_CASES]
)
def test_every_bad_input_in_a_fresh_process(case, shared, tmp_path, binarize_process):
    if case in UNWRITABLE_CASES and not (UNWRITABLE / "self").exists():
        pytest.skip("needs Linux /proc")
    _check_in_subprocess(case, shared, tmp_path, binarize_process)
