"""Regenerate docs/benchmarks.md from the benchmark scripts.

Each benchmark writes one markdown section (date, machine, exact command, results, target)
into ``benchmarks/results/<name>.md``; this script reruns the benchmarks named on the command
line (default: none, just reassemble) and concatenates every section into
``docs/benchmarks.md``. A hand-written ``benchmarks/results/<name>.notes.md`` (why a target
was missed, what was tried) follows its section and survives reruns.

Usage::

    python benchmarks/make_page.py                      # reassemble from benchmarks/results/
    python benchmarks/make_page.py --run step_time      # rerun one benchmark, then reassemble
    python benchmarks/make_page.py --run all            # rerun everything (hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

#: name -> commands (each writes one section via --out / --output; several are concatenated).
BENCHMARKS: dict[str, list[list[str]]] = {
    "step_time": [
        [
            "benchmarks/bench_step_time.py",
            *("--sizes", "32", "224", "--batch", "64", "--rounds", "9"),
            "--unfused",
        ],
        [
            "benchmarks/bench_step_time.py",
            *("--sizes", "32", "--batch", "64", "--rounds", "9", "--compile"),
        ],
        [
            "benchmarks/bench_step_time.py",
            *("--sizes", "224", "--batch", "64", "--rounds", "9", "--compile"),
        ],
        [
            "benchmarks/bench_step_time.py",
            *("--sizes", "32", "224", "--batch", "64", "--rounds", "9"),
            "--system-heap",
        ],
    ],
    "accuracy": [["benchmarks/bench_accuracy.py", "--baseline-epochs", "8", "--epochs", "2"]],
    "runtime": [
        ["benchmarks/bench_runtime.py", "--threads", "1", "--numpy", "--repeats", "30"],
        ["benchmarks/bench_runtime.py", "--threads", "2", "--repeats", "30"],
    ],
    "onnx": [["benchmarks/bench_onnx.py", "--runs", "50"]],
    "sensitivity": [
        [
            "benchmarks/bench_sensitivity.py",
            *("--model", "resnet18", "--baseline-epochs", "8", "--epochs", "1"),
            *("--configs", "pa:4:5", "pa:8:7", "abc:5:5", "--auto-at", "pa:4:5"),
            *("--frontier", "pa:2:5", "pa:4:5", "pa:6:5", "pa:8:7"),
            *("--plot", "docs/figures/sensitivity-resnet18.png"),
        ],
        [
            "benchmarks/bench_sensitivity.py",
            *("--model", "mobilenetv2_100", "--baseline-epochs", "10"),
            *("--epochs", "1", "--configs", "pa:8:7", "--auto-at", "pa:8:7"),
            *("--plot", "docs/figures/sensitivity-mobilenetv2_100.png"),
        ],
    ],
    "schemes": [
        [
            "benchmarks/bench_schemes.py",
            *("--model", "resnet18", "--baseline-epochs", "8", "--epochs", "1", "--seed", "0"),
            *("--configs", "bnn:1:1", "xnor:1:1", "bireal:1:1", "dorefa:1:1", "ttq:2:0"),
            *("realtobin:1:1", "realtobin:1:1:distill=attention,progressive=true"),
            *("pa:4:5", "abc:5:5"),
        ],
    ],
}
ORDER = ("accuracy", "sensitivity", "schemes", "step_time", "runtime", "onnx")
OUT_FLAG = {"runtime": "--output"}

HEADER = """# Benchmarks

Every figure here was measured by a script in `benchmarks/`; each section gives its date,
machine, exact command and the target it is held against. Speed is always a ratio against a
reference run in the same process (these machines are shared and noisy). Regenerate with
`python benchmarks/make_page.py --run all` (or `--run NAME` for one section).

"""


def run(name: str) -> None:
    """Run every command of benchmark ``name``; its sections replace ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    sections = []
    for i, args in enumerate(BENCHMARKS[name]):
        part = RESULTS / f".{name}.{i}.md"
        cmd = [sys.executable, *args, OUT_FLAG.get(name, "--out"), str(part)]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        sections.append(part.read_text().rstrip() + "\n")
        part.unlink()
    (RESULTS / f"{name}.md").write_text("\n".join(sections))


def assemble() -> str:
    parts = [HEADER]
    for name in ORDER:
        section = RESULTS / f"{name}.md"
        if section.is_file():
            parts.append(section.read_text().rstrip() + "\n\n")
            notes = RESULTS / f"{name}.notes.md"  # written by hand: why a target was missed
            if notes.is_file():
                parts.append(notes.read_text().rstrip() + "\n\n")
        else:
            parts.append(
                f"## {name}\n\nNot measured yet: run `python benchmarks/make_page.py --run {name}`.\n\n"
            )
    return "".join(parts).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", nargs="*", default=[], help=f"benchmarks to rerun: {', '.join(BENCHMARKS)} or all"
    )
    args = parser.parse_args()
    names = list(BENCHMARKS) if "all" in args.run else args.run
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        run(name)
    PAGE.write_text(assemble())
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
