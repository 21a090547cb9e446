"""The full-precision baseline: adapt the model to the data when needed, cache it, report it.

Policy (:func:`ensure_baseline`):

* If the model's classifier does not match the data's classes it is reset
  (:func:`binarize_cli.load.models.reset_classifier`).
* Training is needed when the weights are random, or the classifier is fresh (reset here or
  by :func:`~binarize_cli.load.models.load_model`). Then the whole network is trained for
  ``epochs`` with Adam (``lr``, no weight decay) and a per-step cosine schedule to 0, on
  deterministic loaders (``make_loader(seed=seed + epoch)``), starting from a seeded
  initialisation: random models are re-initialised and fresh classifiers re-reset under
  ``torch.manual_seed(seed)`` (the caller's RNG state is left untouched), so a cached and a
  freshly trained baseline are the same function of the key.
* Otherwise (pretrained or checkpoint weights whose classifier already matches the data)
  nothing is trained and ``epochs``/``lr``/``batch_size``/``seed`` are ignored; only the
  accuracy is computed (and cached, which matters on large validation sets).

Cache: ``$BINARIZE_CACHE`` (default ``~/.cache/binarize``) ``/baselines/<arch>-<key>/`` with
``model.safetensors`` (trained baselines only) and ``baseline.json``. ``key`` is the first 16
hex digits of the SHA-256 of the sorted-JSON of: model spec, weights identity, data spec,
input size, mean, std, num_classes, whether it trains and, if so, epochs, batch size, lr and
seed (plus a format version); for a user's ``MODULE:CLASS`` model also the SHA-256 of the
file defining the class, so an edited class is not served a stale baseline; and, for a
trained baseline, how it trained when that is not the CPU in float32 eager mode (the device
type, ``amp``, ``compile``: each gives other weights), so a CPU run never reads a baseline a GPU
trained. Files are written atomically (:mod:`binarize_cli.core.files`),
the json last, so a crashed run never leaves an entry that looks complete; an unreadable
entry is ignored and rebuilt.

:data:`DEFAULT_BASELINE_EPOCHS`, :data:`DEFAULT_BASELINE_LR` and
:data:`DEFAULT_BASELINE_BATCH_SIZE` are tuned so that timm ``resnet18`` (random init, 32x32
digits, 2 CPU cores) reaches >= 95 % top-1 on the digits validation split in about a minute.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize_cli.convert.finetune import check_finite_state
from binarize_cli.convert.training import (
    Accuracy,
    Execution,
    compiled,
    evaluate,
    progress_bar,
    train_one_epoch,
)
from binarize_cli.core.errors import TrainingDivergedError
from binarize_cli.core.files import atomic_write_bytes, atomic_write_json
from binarize_cli.load.data import DataBundle, make_loader
from binarize_cli.load.models import (
    LoadedModel,
    class_source_digest,
    create_architecture,
    reset_classifier,
)

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_BASELINE_BATCH_SIZE",
    "DEFAULT_BASELINE_EPOCHS",
    "DEFAULT_BASELINE_LR",
    "Baseline",
    "baseline_key",
    "cache_root",
    "ensure_baseline",
]

DEFAULT_BASELINE_EPOCHS = 4
DEFAULT_BASELINE_LR = 2e-3
DEFAULT_BASELINE_BATCH_SIZE = 64
#: Bumped when the cache layout or the training recipe changes meaning.
CACHE_FORMAT = 1


@dataclass
class Baseline:
    """The full-precision reference: model (trained or as loaded), its accuracy, timings."""

    model: nn.Module
    accuracy: Accuracy
    epoch_times: list[float]
    cache_hit: bool
    cache_path: Path | None
    trained: bool = False
    key: str = ""
    epoch_stats: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$BINARIZE_CACHE``, else ``~/.cache/binarize``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BINARIZE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/binarize").expanduser()


def baseline_key(
    loaded: LoadedModel,
    data: DataBundle,
    *,
    train: bool,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    execution: Execution | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key (16 hex digits) and the fields it hashes: the model, its weights, the
    data and the whole preprocessing record its inputs are made with; ``execution`` (default: the
    CPU, float32, eager) adds its device type, ``amp`` and ``compile`` where they differ from
    that default (so keys of CPU runs are unchanged)."""
    fields: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": loaded.spec,
        "weights": loaded.weights,
        "data": data.spec,
        "input_size": [int(v) for v in data.input_size],
        "mean": [round(float(v), 6) for v in data.mean],
        "std": [round(float(v), 6) for v in data.std],
        # every other step that makes an input (resize, crop, interpolation, grey, pixel
        # scale, class names): the same data spec can be read with another record
        "preprocessing": data.preprocessing.to_dict(),
        "num_classes": int(data.num_classes),
        "train": bool(train),
    }
    if loaded.family == "python":  # a user class: its code can change under the same spec
        fields["source_sha256"] = class_source_digest(loaded.arch)
    if train:
        fields.update(
            {
                "epochs": int(epochs),
                "batch_size": int(batch_size),
                "lr": float(lr),
                "seed": int(seed),
            }
        )
        run = execution or Execution()
        device_type = torch.device(run.device).type
        if device_type != "cpu":
            fields["device"] = device_type
        if run.amp != "off":
            fields["amp"] = run.amp
        if run.compile:
            fields["compile"] = True
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16], fields


def _save_model(model: nn.Module, path: Path) -> None:
    """Every state tensor, cloned (so tied weights are stored twice, never as shared storage)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": str(CACHE_FORMAT)}), flag=None)


def _load_model_into(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)


def _read_entry(directory: Path, key: str, train: bool) -> dict[str, Any] | None:
    meta_path = directory / "baseline.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or "accuracy" not in meta:
        return None
    if train and not (directory / "model.safetensors").is_file():
        return None
    return meta


def _step_info(loss: float, acc: float, ips: float) -> str:
    """The baseline bar's info text: running loss, accuracy and images/s."""
    return f"loss {loss:.3f}  acc {acc:5.1f}%  {ips:.0f} img/s"


def _make_progress(progress: Any) -> tuple[Any, bool]:
    """A rich Progress from a Console (ours to start/stop) or a Progress (the caller's)."""
    from rich.console import Console
    from rich.progress import Progress

    if isinstance(progress, Progress):
        return progress, False
    console = progress if isinstance(progress, Console) else None
    return progress_bar("[bold]{task.description}", console), True


@dataclass(frozen=True)
class _Recipe:
    """How a baseline trains and is evaluated (see the module doc); ``progress`` as in
    :func:`ensure_baseline`."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    execution: Execution
    progress: Any


def _train(
    loaded: LoadedModel, data: DataBundle, recipe: _Recipe
) -> tuple[list[float], list[dict[str, float]]]:
    """``recipe.epochs`` of Adam with a per-step cosine schedule to 0; the epoch times and
    :meth:`EpochStats.summary` records."""
    epochs, batch_size, lr, seed = recipe.epochs, recipe.batch_size, recipe.lr, recipe.seed
    run, progress = recipe.execution, recipe.progress
    model = loaded.model
    net = compiled(model, run.compile)  # the training steps' module; shares model's weights
    scaler = run.grad_scaler()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n_train = len(data.train)  # type: ignore[arg-type]
    drop_last = n_train > batch_size  # no BatchNorm-breaking batch of 1 at the end
    steps_per_epoch = n_train // batch_size if drop_last else 1
    total = max(1, epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    times: list[float] = []
    stats_list: list[dict[str, float]] = []
    bar, owned = (None, False) if progress is None else _make_progress(progress)
    if bar is not None and owned:
        bar.start()
    try:
        for epoch in range(epochs):
            loader = make_loader(
                data.train,
                batch_size=batch_size,
                shuffle=True,
                seed=seed + epoch,
                drop_last=drop_last,
                **run.loader_options,
            )
            on_step = None
            if bar is not None:
                task = bar.add_task(
                    f"baseline {loaded.arch} epoch {epoch + 1}/{epochs}",
                    total=len(loader),
                    info=_step_info(0.0, 0.0, 0.0),
                )

                def on_step(
                    step: int,
                    tot: int | None,
                    loss: float,
                    acc: float,
                    ips: float,
                    task: Any = task,
                ) -> None:
                    bar.update(task, completed=step, info=_step_info(loss, acc, ips))

            try:
                stats = train_one_epoch(
                    net,
                    loader,
                    optimizer,
                    scheduler=scheduler,
                    device=run.device,
                    on_step=on_step,
                    epoch=epoch,
                    amp=run.amp,
                    scaler=scaler,
                )
                check_finite_state(model)
            except TrainingDivergedError as exc:
                head = str(exc).split(";")[0].strip()
                hint = " or train without --amp" if run.amp != "off" else ""
                raise TrainingDivergedError(
                    f"full-precision baseline {head.removeprefix('training ')}; "
                    f"lower --baseline-lr{hint} or check the data (nothing was cached)"
                ) from None
            times.append(float(stats.seconds))
            stats_list.append(stats.summary())
    finally:
        if bar is not None and owned:
            bar.stop()
    return times, stats_list


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]


def _from_cache(
    directory: Path, key: str, model: nn.Module, *, train: bool, device: str, notes: list[str]
) -> tuple[Accuracy, list[float], list[dict[str, float]]] | None:
    """A complete entry's accuracy and training record, its weights (trained baselines)
    loaded into ``model``; None when there is none or it is damaged (noted; rebuilt)."""
    entry = _read_entry(directory, key, train)
    if entry is None:
        return None
    try:
        if train:
            _load_model_into(model, directory / "model.safetensors")
        model.to(device).eval()
        acc = Accuracy(
            **{
                k: entry["accuracy"][k]
                for k in ("top1", "top5", "samples")
                if k in entry["accuracy"]
            }
        )
        times = [float(t) for t in entry.get("epoch_times", [])]
        return acc, times, list(entry.get("epoch_stats", []))
    except Exception as exc:  # a damaged entry: rebuild it
        notes.append(f"ignored an unreadable cached baseline in {directory} ({type(exc).__name__})")
    return None


def _fit(
    loaded: LoadedModel, data: DataBundle, val_loader: Any, *, train: bool, recipe: _Recipe
) -> tuple[Accuracy, list[float], list[dict[str, float]]]:
    """Train (when ``train``) from the seeded initialisation of the module doc, under a forked
    RNG, then evaluate; ``loaded.model`` ends on ``device`` in eval mode."""
    seed, device = recipe.seed, recipe.execution.device
    model = loaded.model
    times: list[float] = []
    stats: list[dict[str, float]] = []
    cuda = torch.device(device).type == "cuda"
    fork_devices = [torch.device(device).index or 0] if cuda else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if train:
            if loaded.weights == "random":
                fresh = create_architecture(loaded.spec, data.num_classes).model
                model.load_state_dict(fresh.state_dict())
            else:
                reset_classifier(loaded, data.num_classes)
            model.to(device)
            times, stats = _train(loaded, data, recipe)
        model.to(device)
        acc = evaluate(model, val_loader, device=device)
    model.eval()
    return acc, times, stats


def _write_cache(
    directory: Path,
    model: nn.Module,
    key: str,
    fields: dict[str, Any],
    record: tuple[Accuracy, list[float], list[dict[str, float]]],
    *,
    train: bool,
    notes: list[str],
) -> Path | None:
    """Write the entry (weights first, the json last); None, with a note, when it cannot.
    ``record`` is the accuracy, epoch times and epoch stats."""
    acc, times, stats = record
    meta = {
        "key": key,
        "fields": fields,
        "accuracy": {"top1": acc.top1, "top5": acc.top5, "samples": acc.samples},
        "epoch_times": times,
        "epoch_stats": stats,
        "trained": train,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        if train:
            _save_model(model, directory / "model.safetensors")
        atomic_write_json(directory / "baseline.json", meta, flag=None)
        return directory
    except OSError as exc:
        notes.append(f"could not write the baseline cache {directory} ({exc.strerror or exc})")
    return None


def ensure_baseline(
    loaded: LoadedModel,
    data: DataBundle,
    *,
    epochs: int = DEFAULT_BASELINE_EPOCHS,
    batch_size: int = DEFAULT_BASELINE_BATCH_SIZE,
    lr: float = DEFAULT_BASELINE_LR,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Any = None,
    execution: Execution | None = None,
    use_cache: bool = True,
) -> Baseline:
    """Adapt (if needed), evaluate and cache the full-precision model; see the module doc.

    ``loaded.model`` is modified in place (classifier reset, trained weights) and returned
    as ``Baseline.model``, on ``execution.device``, in eval mode. ``execution`` (default: the
    CPU, float32, eager, no loader workers) is where and how it trains and is evaluated
    (evaluation is always float32 eager). ``progress`` (a rich ``Console`` or ``Progress``)
    shows a bar per training epoch; without it nothing is displayed.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    notes: list[str] = []
    if loaded.num_classes != data.num_classes:
        reset_classifier(loaded, data.num_classes)
        notes.append(f"classifier reset to {data.num_classes} classes for {data.name}")
    train = loaded.weights == "random" or loaded.classifier_reset
    run = execution or Execution()
    key, fields = baseline_key(
        loaded,
        data,
        train=train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        execution=run,
    )
    directory = cache_root(cache_dir) / "baselines" / f"{_slug(loaded.arch)}-{key}"
    model = loaded.model
    val_loader = make_loader(
        data.val, batch_size=max(batch_size, 128), shuffle=False, seed=seed, **run.loader_options
    )

    cached = None
    if use_cache:
        cached = _from_cache(directory, key, model, train=train, device=run.device, notes=notes)
    if cached is not None:
        (acc, times, stats), path = cached, directory
    else:
        recipe = _Recipe(epochs, batch_size, lr, seed, run, progress)
        acc, times, stats = _fit(loaded, data, val_loader, train=train, recipe=recipe)
        record = (acc, times, stats)
        path = None
        if use_cache:
            path = _write_cache(directory, model, key, fields, record, train=train, notes=notes)
    return Baseline(
        model=model,
        accuracy=acc,
        epoch_times=times,
        cache_hit=cached is not None,
        cache_path=path,
        trained=train,
        key=key,
        epoch_stats=stats,
        notes=notes,
    )
