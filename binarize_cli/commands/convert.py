"""`binarize convert`: load, baseline, surgery, calibrate, fine-tune, save.

The command function runs past 80 lines only because Typer reads `convert`'s options from its
parameter list (one annotated parameter per option); its body is short.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from binarize_cli.commands._common import (
    console,
    data_spec,
    err_console,
    lower_choice,
    option,
)
from binarize_cli.core.errors import BadInputError
from binarize_cli.core.metadata import GAP_DEFINITION, RunMetadata, accuracy_gap
from binarize_cli.core.settings import ConvertSettings


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
        from binarize_cli.convert.training import progress_bar

        self.progress = progress_bar(
            f"fine-tune epoch {epoch + 1}/{num_epochs}", err_console, transient=False
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


def _shape(d: Any) -> str:
    shape = f"{d.in_channels}->{d.out_channels}"
    if d.kernel_size:
        shape += " k" + "x".join(map(str, d.kernel_size))
    if d.stride and max(d.stride) > 1:
        shape += " s" + "x".join(map(str, d.stride))
    if d.groups != 1:
        shape += f" g{d.groups}"
    return shape


def _decisions_table(decisions: list[Any], width: int | None = None) -> Table:
    """Graph surgery: one row per layer with its bases (``M/N``: each binarized layer's own,
    ``-`` for full precision); fitted to ``width`` (``kind``, then ``why`` dropped; names,
    shapes and bases never cut) by :func:`binarize_cli.render.fitted_table`."""
    from binarize_cli.render import Col, Row, fitted_table

    cols = [
        Col("layer"),
        Col("kind"),
        Col("shape"),
        Col("precision"),
        Col("bases", "M/N", right=True),
        Col("why", wrap=True),
    ]
    rows: list[Row] = []
    for d in decisions:
        precision = Text("binarized", style="green") if d.binarized else "full precision"
        bases = f"{d.m}/{d.n}" if d.binarized and d.m is not None else "-"
        cells = {"layer": d.name, "kind": d.kind, "shape": _shape(d), "precision": precision}
        rows.append(({**cells, "bases": bases, "why": d.reason}, None))
    return fitted_table(
        "Graph surgery", cols, rows, width=width, drop=("kind", "why"), simple=False
    )


def _allocation_line(allocation: dict[str, Any]) -> str:
    """What ``--policy auto`` chose, in one line: memory against its budget and the uniform
    model's, and the summed measured output error."""
    budget = allocation.get("budget_bits")
    text = f"per-layer bases allocated: {allocation['memory_bits'] / 1e6:.2f} Mbit"
    if budget is not None:
        text += f" (budget {budget / 1e6:.2f})"
    return (
        f"{text}, uniform {allocation['uniform_bits'] / 1e6:.2f} Mbit; summed output error "
        f"{allocation['error']:.4f} (uniform {allocation['uniform_error']:.4f})"
    )


def _gap_cell(fp: Any, row: Any) -> str:
    """The gap column's cell (:func:`~binarize_cli.core.metadata.accuracy_gap`, top-1)."""
    gap = None if fp is None else accuracy_gap(fp.top1, row.top1)
    return "" if gap is None else f"{gap:.2f}"


def _accuracy_table(meta: RunMetadata) -> Table:
    table = Table(title=f"{meta.model}  {meta.scheme}  M={meta.M} N={meta.N}  on {meta.data}")
    table.caption = GAP_DEFINITION
    table.add_column("model")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_column("top-1 gap", justify="right")
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
        gap = "" if key == "fp" else _gap_cell(fp, row)
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


# The command's options (Typer reads each one's help from its annotation). Their Python
# defaults are None so a recipe's values are not overridden; the defaults shown in --help
# are ConvertSettings' (what an option left unset, in no recipe, becomes).
_DEFAULTS = ConvertSettings()
#: Each built-in scheme's default (M, N), for --help without importing torch at start-up
#: (tests/cli/test_cli_help.py holds it to the scheme registry).
SCHEME_DEFAULTS = {
    "pa": (4, 5),
    "abc": (5, 5),
    "bnn": (1, 1),
    "xnor": (1, 1),
    "bireal": (1, 1),
    "dorefa": (2, 2),
    "ttq": (2, 0),
    "realtobin": (1, 1),
}


def _per_scheme(index: int) -> str:
    """``-M``/``-N``'s default as --help shows it: each scheme's own value."""
    return "the scheme's: " + ", ".join(f"{k} {v[index]}" for k, v in SCHEME_DEFAULTS.items())


_Model = Annotated[
    str | None,
    typer.Argument(
        help="timm name (resnet18, timm:resnet18.a1_in1k) or torchvision:NAME; "
        "optional with --recipe.",
        show_default="none",
    ),
]

_Arch = Annotated[
    str | None,
    option(
        help="Your own model class as MODULE:CLASS (imported from the current directory or "
        "PYTHONPATH; see docs/api.md), instead of MODEL; weights from --checkpoint.",
        default="none",
    ),
]

_Scheme = Annotated[
    str | None,
    option(
        help=" | ".join(SCHEME_DEFAULTS) + " (any case).",
        default=_DEFAULTS.scheme,
        callback=lower_choice,
    ),
]

_M = Annotated[
    int | None,
    option("-M", help="Weight bases (PA: even number of endpoints).", default=_per_scheme(0)),
]

_N = Annotated[
    int | None,
    option(
        "-N", help="Activation bases; 0 keeps activations full precision.", default=_per_scheme(1)
    ),
]

_Checkpoint = Annotated[
    Path | None,
    option(
        help="Local weights: .safetensors, or .pt/.pth (loaded with weights_only=True).",
        default="none: random init",
    ),
]

_Pretrained = Annotated[
    bool | None,
    option(
        "--pretrained/--no-pretrained",
        help="Pretrained hub weights: read from the local Hugging Face / torch hub caches, "
        "downloaded only when not cached (the run records the file and its sha256).",
        default="--pretrained" if _DEFAULTS.pretrained else "--no-pretrained",
    ),
]

_Data = Annotated[
    str | None,
    option(
        help="digits | fashion-mnist[:PATH] | cifar10:PATH | imagefolder:PATH | fake",
        default=_DEFAULTS.data,
        callback=data_spec,
    ),
]

_InputSize = Annotated[
    int | None,
    typer.Option(help="Input resolution.", show_default="the data's or the model's"),
]

_Epochs = Annotated[
    float | None,
    option(
        help="Fine-tune epochs (fractional allowed; 0 = calibrate only).",
        default=f"{_DEFAULTS.epochs:g}",
    ),
]

_BaselineEpochs = Annotated[
    int | None,
    option(
        help="Epochs to adapt the full-precision baseline when needed.",
        default=str(_DEFAULTS.baseline_epochs),
    ),
]

_BaselineLr = Annotated[
    float | None,
    option(
        help="Learning rate for adapting the baseline (Adam).",
        default=f"{_DEFAULTS.baseline_lr:g}",
    ),
]

_BatchSize = Annotated[
    int | None,
    typer.Option(help="Batch size (paper: 64).", show_default=str(_DEFAULTS.batch_size)),
]

_Lr = Annotated[
    float | None,
    typer.Option(help="Fine-tune learning rate (Adam).", show_default=f"{_DEFAULTS.lr:g}"),
]

_CalibBatches = Annotated[
    int | None,
    typer.Option(help="Batches used for calibration.", show_default=str(_DEFAULTS.calib_batches)),
]

_Recipe = Annotated[
    Path | None,
    typer.Option(help="TOML recipe (see recipes/); flags override it.", show_default="none"),
]

_Seed = Annotated[int | None, typer.Option(help="Random seed.", show_default=str(_DEFAULTS.seed))]

_BaselineSeed = Annotated[
    int | None,
    option(
        help="Seed of the baseline's training; one value reuses one cached baseline for "
        "conversions with different seeds.",
        default="the run's seed",
    ),
]

_Keep = Annotated[
    list[str] | None,
    option(
        help="Regex of layer names to keep full precision (repeatable; 'first'/'last' aliases).",
        default="none: the policy keeps the first conv and the classifier",
    ),
]

_WeightEndpoints = Annotated[
    str | None,
    option(
        help="PA weight endpoints in std units, comma separated (overrides the rule).",
        default="the scheme's rule",
    ),
]

_Distill = Annotated[
    str | None,
    option(
        help="Fine-tuning's teacher: logits: distil the full-precision model's logits | "
        "attention: that plus matching each block's attention map (Real-to-Bin) | off (any "
        "case).",
        default=_DEFAULTS.distill,
        callback=lower_choice,
    ),
]

_NoDistill = Annotated[
    bool,
    typer.Option("--no-distill", help="Fine-tune without a teacher (the same as distill off)."),
]

_Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue an interrupted fine-tune from its last epoch checkpoint."
    ),
]

_Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing run directory at the output (without it, that is an error).",
    ),
]

_Policy = Annotated[
    str | None,
    option(
        help="uniform: -M/-N for every layer | auto: per-layer bases from the measured "
        "sensitivity within the budget (docs/sensitivity.md; any case).",
        default=_DEFAULTS.policy,
        callback=lower_choice,
    ),
]

_BudgetMbit = Annotated[
    float | None,
    option(
        help="Memory budget in Mbit for --policy auto (as report counts memory).",
        default="the uniform -M/-N model's",
    ),
]

_BudgetBops = Annotated[
    float | None,
    option(
        help="Compute budget in bitwise operations per image for --policy auto (a real MAC "
        "counts 64).",
        default="the uniform model's, unless --budget-mbit alone",
    ),
]

_Sensitivity = Annotated[
    bool | None,
    option(
        "--sensitivity/--no-sensitivity",
        help="Measure per-layer sensitivity and keep it with the run (report shows it); "
        "--policy auto always does.",
        default="--no-sensitivity",
    ),
]

_Calibration = Annotated[
    str | None,
    option(
        help="tensor: fit each activation quantizer to its own input | output: then refine "
        "it to minimise each layer's output error (docs/sensitivity.md; any case).",
        default=_DEFAULTS.calibration,
        callback=lower_choice,
    ),
]

_Device = Annotated[
    str | None,
    option(
        help="Where every stage runs (baseline, calibration, fine-tuning, evaluation): "
        "auto | cpu | cuda | cuda:N; auto is cuda when available (docs/devices.md).",
        default=_DEFAULTS.device,
        callback=lower_choice,
    ),
]

_Workers = Annotated[
    int | None,
    option(
        help="Data-loading worker processes (0: load in the main process).",
        default=str(_DEFAULTS.workers),
    ),
]

_Amp = Annotated[
    str | None,
    option(
        help="Mixed-precision training: off | bf16 | fp16 (fp16 on CUDA only); the "
        "quantizers stay float32, accuracies are measured in float32.",
        default=_DEFAULTS.amp,
        callback=lower_choice,
    ),
]

_Compile = Annotated[
    bool | None,
    option(
        "--compile/--no-compile",
        help="torch.compile the training steps (baseline and fine-tune; the first steps compile).",
        default="--compile" if _DEFAULTS.compile else "--no-compile",
    ),
]

_Output = Annotated[
    Path | None,
    option("-o", "--output", help="Run directory.", default="runs/<model>-<scheme>-M<M>N<N>"),
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
    baseline_seed: _BaselineSeed = None,
    batch_size: _BatchSize = None,
    lr: _Lr = None,
    calib_batches: _CalibBatches = None,
    recipe: _Recipe = None,
    seed: _Seed = None,
    keep: _Keep = None,
    weight_endpoints: _WeightEndpoints = None,
    distill: _Distill = None,
    no_distill: _NoDistill = False,
    policy: _Policy = None,
    budget_mbit: _BudgetMbit = None,
    budget_bops: _BudgetBops = None,
    sensitivity: _Sensitivity = None,
    calibration: _Calibration = None,
    device: _Device = None,
    workers: _Workers = None,
    amp: _Amp = None,
    compile: _Compile = None,
    resume: _Resume = False,
    overwrite: _Overwrite = False,
    output: _Output = None,
) -> None:
    """Convert MODEL into a multiple-binary network and save a run directory."""
    from binarize_cli.convert.pipeline import run_convert
    from binarize_cli.core.settings import load_recipe, merge_settings

    recipe_data = load_recipe(recipe) if recipe is not None else None
    if arch is not None:
        model = _arch_model(arch, model)
    endpoints = None if weight_endpoints is None else _endpoints(weight_endpoints)
    if no_distill:
        if distill not in (None, "off"):
            raise BadInputError(f"--no-distill contradicts --distill {distill}; pass one of them")
        distill = "off"
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
            "baseline_seed": baseline_seed,
            "batch_size": batch_size,
            "lr": lr,
            "calib_batches": calib_batches,
            "seed": seed,
            "keep": list(keep) if keep else None,
            "distill": distill,
            "policy": policy,
            "budget_mbit": budget_mbit,
            "budget_bops": budget_bops,
            "sensitivity": sensitivity,
            "calibration": calibration,
            "device": device,
            "workers": workers,
            "amp": amp,
            "compile": compile,
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
            overwrite=overwrite,
            reporter=reporter,
            progress_console=err_console if is_main else None,
        )
    finally:
        reporter.close()
    if not is_main:
        return
    console.print(_decisions_table(result.decisions, console.width))
    if result.meta.allocation is not None:
        console.print(_allocation_line(result.meta.allocation))
    console.print(_accuracy_table(result.meta))
    for warning in result.warnings:  # after the tables they are about, so they stay in view
        err_console.print(f"[yellow]warning:[/] {warning}")
    ratio = result.meta.timings.step_ratio
    if ratio is not None:
        console.print(
            f"fine-tune step time / full-precision step time: {ratio:.2f}x "
            "(same process, loss and data; benchmarks/bench_step_time.py for the controlled figure)"
        )
    console.print(
        f"run written to [bold]{result.run_dir}[/]  (next: binarize report; binarize export --target onnx)"
    )
