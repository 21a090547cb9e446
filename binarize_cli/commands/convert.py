"""`binarize convert`: load, baseline, surgery, calibrate, fine-tune, save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from binarize_cli.commands._common import console, err_console
from binarize_cli.core.errors import BadInputError
from binarize_cli.core.metadata import RunMetadata


class RichReporter:
    """Shows pipeline stages and a fine-tuning progress bar (loss, accuracy, images/s)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task: Any = None

    def stage(self, text: str) -> None:
        if self.enabled:
            self._close()
            # one line each, however long: the terminal wraps it, rich does not break it
            err_console.print(f"[bold cyan]>[/] {text}", soft_wrap=True)

    def epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        if not self.enabled:
            return
        self._close()
        self.progress = Progress(
            TextColumn(f"fine-tune epoch {epoch + 1}/{num_epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("finetune", total=steps, info="")

    def step(self, step: int, total: int, loss: float, acc: float, images_per_s: float) -> None:
        if self.progress is not None:
            info = f"loss {loss:.3f}  acc {acc:5.1f}%  {images_per_s:6.0f} img/s"
            self.progress.update(self.task, completed=step, total=total, info=info)

    def epoch_end(self, epoch: int, seconds: float) -> None:
        self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    close = _close


def _decisions_table(decisions: list[Any]) -> Table:
    table = Table(title="Graph surgery", show_lines=False)
    for col in ("layer", "kind", "shape", "precision", "why"):
        table.add_column(col)
    for d in decisions:
        shape = f"{d.in_channels}->{d.out_channels}"
        if d.kernel_size:
            shape += " k" + "x".join(map(str, d.kernel_size))
        if d.stride and max(d.stride) > 1:
            shape += " s" + "x".join(map(str, d.stride))
        if d.groups != 1:
            shape += f" g{d.groups}"
        precision = "[green]binarized[/]" if d.binarized else "full precision"
        table.add_row(d.name, d.kind, shape, precision, d.reason)
    return table


def _accuracy_table(meta: RunMetadata) -> Table:
    table = Table(title=f"{meta.model}  {meta.scheme}  M={meta.M} N={meta.N}  on {meta.data}")
    table.add_column("model")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_column("gap top-1", justify="right")
    fp = meta.accuracy.fp
    stages = (
        ("fp", "full precision"),
        ("calibrated", "calibrated (no training)"),
        ("binarized", "fine-tuned"),
    )
    for key, label in stages if meta.fine_tuned else stages[:2]:  # --epochs 0: no fine-tuning
        row = meta.accuracy.stage(key)
        if row is None:
            continue
        gap = "" if key == "fp" or fp is None else f"{row.top1 - fp.top1:+.2f}"
        table.add_row(label, f"{row.top1:.2f}%", f"{row.top5:.2f}%", gap)
    return table


def _endpoints(text: str) -> list[float]:
    """``--weight-endpoints`` as floats: comma separated, empty items skipped."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(
            f"--weight-endpoints must be comma-separated numbers (got {text!r})"
        ) from None


def _arch_model(arch: str, model: str | None) -> str:
    """``--arch MODULE:CLASS`` is the model spec; MODEL may not name another one."""
    from binarize_cli.load.models import is_class_spec

    if not is_class_spec(arch):
        raise BadInputError(
            f"--arch takes MODULE:CLASS (e.g. mymodels:TinyNet), got {arch!r}; "
            "timm and torchvision models go in MODEL"
        )
    if model is not None and model != arch:
        raise BadInputError(f"give MODEL ({model!r}) or --arch ({arch!r}), not both")
    return arch.strip()


# The command's options (Typer reads each one's help from its annotation).
_Model = Annotated[
    str | None,
    typer.Argument(
        help="timm name (resnet18, timm:resnet18.a1_in1k) or torchvision:NAME; optional with --recipe."
    ),
]

_Arch = Annotated[
    str | None,
    typer.Option(
        help="Your own model class as MODULE:CLASS (imported from the current directory or "
        "PYTHONPATH; see docs/api.md), instead of MODEL; weights from --checkpoint."
    ),
]

_Scheme = Annotated[str | None, typer.Option(help="pa | abc | bnn | xnor | bireal | dorefa")]

_M = Annotated[int | None, typer.Option("-M", help="Weight bases (PA: even number of endpoints).")]

_N = Annotated[
    int | None, typer.Option("-N", help="Activation bases; 0 keeps activations full precision.")
]

_Checkpoint = Annotated[
    Path | None,
    typer.Option(help="Local weights: .safetensors, or .pt/.pth (loaded with weights_only=True)."),
]

_Pretrained = Annotated[
    bool | None,
    typer.Option(
        "--pretrained/--no-pretrained",
        help="Pretrained hub weights: read from the local Hugging Face / torch hub caches, "
        "downloaded only when not cached (the run records the file and its sha256).",
    ),
]

_Data = Annotated[
    str | None,
    typer.Option(
        help="digits (default) | fashion-mnist[:PATH] | cifar10:PATH | imagefolder:PATH | fake"
    ),
]

_InputSize = Annotated[
    int | None, typer.Option(help="Input resolution (default: the data's or the model's).")
]

_Epochs = Annotated[
    float | None,
    typer.Option(help="Fine-tune epochs (fractional allowed; 0 = calibrate only)."),
]

_BaselineEpochs = Annotated[
    int | None, typer.Option(help="Epochs to adapt the full-precision baseline when needed.")
]

_BaselineLr = Annotated[
    float | None, typer.Option(help="Learning rate for adapting the baseline (Adam).")
]

_BatchSize = Annotated[int | None, typer.Option(help="Batch size (paper: 64).")]

_Lr = Annotated[float | None, typer.Option(help="Fine-tune learning rate (Adam).")]

_CalibBatches = Annotated[int | None, typer.Option(help="Batches used for calibration.")]

_Recipe = Annotated[
    Path | None, typer.Option(help="TOML recipe (see recipes/); flags override it.")
]

_Seed = Annotated[int | None, typer.Option(help="Random seed.")]

_Keep = Annotated[
    list[str] | None,
    typer.Option(
        help="Regex of layer names to keep full precision (repeatable; 'first'/'last' aliases)."
    ),
]

_WeightEndpoints = Annotated[
    str | None,
    typer.Option(help="PA weight endpoints in std units, comma separated (overrides the rule)."),
]

_Distill = Annotated[
    bool | None,
    typer.Option(
        "--distill/--no-distill",
        help="Distil from the full-precision model during fine-tuning (default: on).",
    ),
]

_Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue an interrupted fine-tune from its last epoch checkpoint."
    ),
]

_Output = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="Run directory (default runs/<model>-<scheme>-M<M>N<N>)."),
]


def convert(
    model: _Model = None,
    arch: _Arch = None,
    scheme: _Scheme = None,
    m: _M = None,
    n: _N = None,
    checkpoint: _Checkpoint = None,
    pretrained: _Pretrained = None,
    data: _Data = None,
    input_size: _InputSize = None,
    epochs: _Epochs = None,
    baseline_epochs: _BaselineEpochs = None,
    baseline_lr: _BaselineLr = None,
    batch_size: _BatchSize = None,
    lr: _Lr = None,
    calib_batches: _CalibBatches = None,
    recipe: _Recipe = None,
    seed: _Seed = None,
    keep: _Keep = None,
    weight_endpoints: _WeightEndpoints = None,
    distill: _Distill = None,
    resume: _Resume = False,
    output: _Output = None,
) -> None:
    """Convert MODEL into a multiple-binary network and save a run directory."""
    from binarize_cli.convert.pipeline import run_convert
    from binarize_cli.core.settings import load_recipe, merge_settings

    recipe_data = load_recipe(recipe) if recipe is not None else None
    if arch is not None:
        model = _arch_model(arch, model)
    endpoints = None if weight_endpoints is None else _endpoints(weight_endpoints)
    settings = merge_settings(
        recipe_data,
        {
            "model": model,
            "scheme": scheme,
            "M": m,
            "N": n,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "pretrained": pretrained,
            "data": data,
            "input_size": input_size,
            "epochs": epochs,
            "baseline_epochs": baseline_epochs,
            "baseline_lr": baseline_lr,
            "batch_size": batch_size,
            "lr": lr,
            "calib_batches": calib_batches,
            "seed": seed,
            "keep": list(keep) if keep else None,
            "distill": distill,
            "scheme_options": None if endpoints is None else {"weight_endpoints": endpoints},
        },
    )
    is_main = int(os.environ.get("RANK", "0")) == 0
    reporter = RichReporter(enabled=is_main)
    try:
        result = run_convert(
            settings,
            out_dir=output,
            resume=resume,
            reporter=reporter,
            progress_console=err_console if is_main else None,
        )
    finally:
        reporter.close()
    if not is_main:
        return
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")
    console.print(_decisions_table(result.decisions))
    console.print(_accuracy_table(result.meta))
    t = result.meta.timings
    if t.baseline_epoch_s and t.finetune_epoch_s:
        ratio = (sum(t.finetune_epoch_s) / len(t.finetune_epoch_s)) / (
            sum(t.baseline_epoch_s) / len(t.baseline_epoch_s)
        )
        console.print(f"fine-tune epoch time / full-precision epoch time: {ratio:.2f}x")
    console.print(
        f"run written to [bold]{result.run_dir}[/]  (next: binarize report; binarize export --target onnx)"
    )
