"""Every command shown in README.md and docs/*.md runs as shown, or is explicitly classified.

Commands are collected from

* fenced code blocks marked bash/sh/shell/console/zsh (in ``console`` blocks only the
  ``$ `` lines), and any line starting with ``$ ``;
* indented (4-space) code blocks: each line whose first word is a known program
  (:data:`PROGRAMS`); other lines there are formulas or output;
* inline code spans in the prose that start with a known program and have arguments
  (``binarize report --paper``, ``python benchmarks/make_page.py --run all``).

``\\`` continuations are joined, a leading ``$ `` and trailing ``# comments`` are dropped.
Each command is then exactly one of

* CHEAP: run by :func:`test_cheap_command_runs` in a temporary working directory (exit code,
  expected output and files checked); the heavier ones are marked ``slow``;
* EXPENSIVE: not run, for the reason given in :data:`EXPENSIVE`;
* a synopsis: usage text with placeholders (``[--json]``, ``MODEL``, ``a|b``, ``...``,
  ``<run>``), which cannot run as shown;
* NOT_COMMANDS: text that looks like a command but is not one.

Every command except NOT_COMMANDS is checked statically (:func:`test_command_is_valid`): the
``binarize`` subcommand and every option exist on the Typer app (and a command without
placeholders parses), option alternatives (``--target onnx|packed``) are named in the
option's help, ``python SCRIPT`` options are defined by the script, ``make`` targets exist
in the Makefile, ``pip`` extras exist in pyproject.toml and every repository path
(``recipes/...``, ``benchmarks/...``, ``tests/...``) exists. A command that is none of the
four fails the test: add it to CHEAP (preferred) or EXPENSIVE with a reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer.main

from binarize_cli.cli import app, main

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session", "zsh"}
PROGRAMS = {"binarize", "python", "python3", "torchrun", "make", "pip", "pip3", "apt-get"}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
TIMEOUT_S = 180


# --- classification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cheap:
    """How to run a cheap command and what it must do."""

    setup: str = ""  # "" (empty directory) | "run" (runs/<run>/) | "packed" (run + packed file)
    rc: int = 0  # the documented exit code
    stdout: tuple[str, ...] = ()  # substrings the output must contain
    creates: tuple[str, ...] = ()  # files (relative to the working directory) it must write
    slow: bool = False


RUN = "test_resnet-pa-M4N5"  # the run directory the tests create; `<run>` in a command

CHEAP: dict[str, Cheap] = {
    "binarize report": Cheap(setup="run", stdout=("memory (Mbit)", "binarized")),
    # README quotes these numbers for this command.
    "binarize report resnet18 --scheme pa -M 4 -N 5 --input-size 224": Cheap(
        stdout=("374.06", "61.66", "1.81e9", "6.48e8")
    ),
    # docs/schemes-abc-baselines.md: TTQ's accounting (test_cli_report.py checks the numbers)
    "binarize report resnet18 --scheme ttq -M 2 -N 0 --input-size 224 --json": Cheap(
        stdout=('"scheme": "ttq"', '"scales": 2')
    ),
    "binarize report --paper": Cheap(stdout=("Table 7",), slow=True),  # builds resnet18/34/50
    "binarize export --target packed": Cheap(
        setup="run", creates=(f"runs/{RUN}/model.packed.safetensors",)
    ),
    "binarize export --target onnx": Cheap(
        setup="run",
        creates=(f"runs/{RUN}/model.onnx",),
        slow=True,  # torch.onnx: ~10 s CPU
    ),
    "binarize verify": Cheap(setup="run", stdout=("top-1 agreement",), slow=True),  # ~15 s CPU
    "binarize run runs/<run>/model.packed.safetensors": Cheap(
        setup="packed",
        stdout=("data digits (recorded in the file)", "top-1", "360 images of digits"),
    ),
    "python -m binarize_cli": Cheap(stdout=("Usage", "convert", "report")),
    "binarize runs": Cheap(setup="run", stdout=("Runs (newest first)", RUN)),
}

# Regular expression (matched at the start of the command) -> why it is not run.
EXPENSIVE: dict[str, str] = {
    r"make (install|demo|test|test-slow)$": "creates .venv from the package registry (network, GBs), "
    "then trains a baseline and fine-tunes, or runs the whole suite (minutes)",
    r"binarize convert resnet18 --scheme pa -M 4 -N 5$": "the demo's full convert: trains the "
    "digits baseline and fine-tunes 2 epochs (minutes); tests/convert/test_convert_pipeline.py runs "
    "tiny converts",
    r"binarize convert mobilenetv2_100 --data digits -M 4 -N 5 --epochs 1$": "trains a "
    "4-epoch mobilenetv2_100 baseline on digits, then fine-tunes (minutes)",
    r"binarize convert mobilenetv2_100 --data fashion-mnist --policy auto -M 8 -N 7 --baseline-epochs 10 ": (
        "the benchmark notes' learning-rate probe: a 10-epoch Fashion-MNIST baseline, "
        "sensitivity and a fine-tune epoch (20+ minutes; tests/cli/test_cli_sensitivity.py "
        "runs --policy auto on a tiny model)"
    ),
    r"binarize convert resnet18 --data digits --epochs 0$": "trains the 4-epoch digits "
    "baseline before calibrating (minutes)",
    r"binarize convert resnet18 --data digits -M 4 -N 5 --epochs 0 --(sensitivity|policy auto)": (
        "trains the 4-epoch digits baseline and measures 19 layers' sensitivity (minutes); "
        "tests/cli/test_cli_sensitivity.py runs the same flags on a tiny model"
    ),
    r"binarize convert resnet18 --data digits -M 4 -N 5 --epochs 0 --calibration": (
        "trains the 4-epoch digits baseline and reconstructs 19 layers' outputs (minutes); "
        "tests/convert/test_calibrate_output.py runs the flag on a tiny model"
    ),
    r"binarize convert .*--data imagefolder:/data/imagenet": "needs ImageNet and a checkpoint",
    r"binarize convert --arch mymodels:TinyNet ": "needs the reader's own mymodels.py and "
    "checkpoint; tests/cli/test_convert_arch.py runs the same command on a tiny class",
    r"torchrun ": "multi-process fine-tuning on ImageNet",
    r"(\.venv/bin/)?python -m pytest ": "runs other test files; the suite runs them itself",
    r"(\.venv/bin/)?python benchmarks/\w+\.py": "benchmarks run for minutes to hours",
    r"pip install ": "installs from the package registry (network)",
    r"apt-get install ": "system package: needs root and network",
}

# Command-like code spans that are not commands -> what they are.
NOT_COMMANDS: dict[str, str] = {
    "binarize 0.1.0": "the `producer` metadata value in docs/format.md",
    "binarize convert": "the subcommand named in prose",
}


# --- extraction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository
    line: int
    text: str  # normalised: tokens joined by one space, no `$ `, no comment
    tokens: tuple[str, ...] = field(compare=False)
    inline: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # unbalanced quotes in prose
        return text.split()


def _program_index(tokens: list[str], any_program: bool = False) -> int | None:
    """Index of the program after any `NAME=value` prefixes, or None if it is no command.

    Without `any_program`, only the programs in PROGRAMS count (indented blocks and prose
    also hold formulas and output).
    """
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[i]):
        i += 1
    if i == len(tokens):
        return None
    prog = tokens[i]
    if any_program or prog in PROGRAMS or prog.startswith(".venv/bin/"):
        return i
    return None


@dataclass
class _Line:
    number: int
    text: str
    any_program: bool  # a fenced shell block or a `$ ` line: every line is a command


def _command(file: str, line: _Line, *, inline: bool = False) -> DocCommand | None:
    text = line.text.strip()
    if text.startswith("$ "):
        text = text[2:]
    tokens = _tokens(text)
    start = _program_index(tokens, line.any_program)
    if start is None or (inline and len(tokens) - start < 2):  # `make`, `binarize` in prose
        return None
    return DocCommand(file, line.number, " ".join(tokens), tuple(tokens), inline)


def extract_text(rel: str, markdown: str) -> list[DocCommand]:
    """The commands shown in one markdown text, in order of their first line."""
    lines = markdown.splitlines()
    shell: list[_Line] = []  # command lines of code blocks, `\` continuations joined
    prose = list(lines)  # with code blocks blanked out, for the inline spans
    fence: str | None = None
    fence_lang = ""
    in_indented = continued = False
    previous_blank = True
    for i, raw in enumerate(lines):
        stripped = raw.strip()
        line: _Line | None = None
        marker = re.match(r"\s*(```+|~~~+)\s*([\w-]*)", raw)
        if fence is not None:
            prose[i] = ""
            if marker and marker.group(1).startswith(fence):
                fence = None
            elif fence_lang in SHELL_LANGS and stripped:
                # console blocks: `$ ` lines are commands, the rest is their output
                shown = continued or stripped.startswith("$ ") or fence_lang != "console"
                line = _Line(i + 1, stripped, True) if shown else None
        elif marker:
            fence, fence_lang = marker.group(1), marker.group(2).lower()
            prose[i] = ""
            in_indented = False
        elif raw.startswith("    ") and stripped and (previous_blank or in_indented):
            in_indented = True
            prose[i] = ""
            known = _program_index(_tokens(stripped)) is not None
            if continued or known or stripped.startswith("$ "):
                line = _Line(i + 1, stripped, stripped.startswith("$ "))
        elif stripped:
            in_indented = False
            if raw.startswith("$ "):
                line = _Line(i + 1, stripped, True)
                prose[i] = ""
        previous_blank = not stripped
        if line is None:
            continued = False
            continue
        if continued:
            shell[-1].text += " " + line.text
        else:
            shell.append(line)
        continued = shell[-1].text.endswith("\\")
        if continued:
            shell[-1].text = shell[-1].text[:-1].rstrip()
    commands = [cmd for line in shell if (cmd := _command(rel, line))]
    prose_text = "\n".join(prose)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose_text):
        number = prose_text.count("\n", 0, match.start()) + 1
        span = _Line(number, match.group(1).replace("\n", " "), False)
        if cmd := _command(rel, span, inline=True):
            commands.append(cmd)
    return sorted(commands, key=lambda c: c.line)


def extract(path: Path) -> list[DocCommand]:
    return extract_text(path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8"))


COMMANDS = [cmd for path in DOC_FILES for cmd in extract(path)]


def _is_synopsis(cmd: DocCommand) -> bool:
    for token in cmd.tokens:
        if any(mark in token for mark in ("[", "]", "|", "...", "…", "<", ">")):
            return True
        if re.fullmatch(r"[A-Z][A-Z_]*", token):  # MODEL, RUN_DIR, FILE, K
            return True
    return False


def classify(cmd: DocCommand) -> tuple[str, str]:
    """(kind, detail): kind is cheap, not-a-command, expensive, synopsis or unclassified."""
    if cmd.text in CHEAP:
        return "cheap", ""
    if cmd.text in NOT_COMMANDS:
        return "not-a-command", NOT_COMMANDS[cmd.text]
    for pattern, reason in EXPENSIVE.items():
        if re.match(pattern, cmd.text):
            return "expensive", reason
    if _is_synopsis(cmd):
        return "synopsis", ""
    return "unclassified", ""


def _ids(commands: list[DocCommand]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for cmd in commands:
        seen[cmd.where] = seen.get(cmd.where, 0) + 1
        ids.append(cmd.where if seen[cmd.where] == 1 else f"{cmd.where}#{seen[cmd.where]}")
    return ids


# --- static checks --------------------------------------------------------------------------

CLI = typer.main.get_command(app)  # typer vendors click: no isinstance checks against `click`
REPO_PATH = re.compile(r"(recipes|benchmarks|examples|tests|docs|binarize_cli)/[\w./-]+")


def _clean(token: str) -> str:
    return token.strip("[]")


def _options_of(command) -> dict[str, object]:
    options: dict[str, object] = {"--help": None}
    for param in command.params:
        for opt in [*param.opts, *param.secondary_opts]:
            if opt.startswith("-"):
                options[opt] = param
    return options


def _is_option(token: str) -> bool:
    return bool(re.match(r"--?[A-Za-z]", token))


def _check_binarize(args: list[str], synopsis: bool) -> list[str]:
    problems = []
    root = _options_of(CLI)
    i = 0
    while i < len(args) and _is_option(_clean(args[i])):
        if _clean(args[i]) not in root:
            problems.append(f"`binarize` has no option {args[i]}")
        i += 1
    if i == len(args):
        return problems
    name = args[i]
    command = CLI.commands.get(name)
    if command is None:
        return [
            *problems,
            f"`binarize` has no subcommand {name!r} (has: {', '.join(CLI.commands)})",
        ]
    options = _options_of(command)
    rest = args[i + 1 :]
    for j, raw in enumerate(rest):
        token = _clean(raw)
        if not _is_option(token):
            continue
        for opt in token.split("/") if token.startswith("--") else [token]:
            opt = opt.split("=", 1)[0]
            if opt not in options:
                problems.append(f"`binarize {name}` has no option {opt}")
                continue
            # `--target onnx|onnx-float|packed`: each alternative is named in the option's help
            value = _clean(rest[j + 1]) if j + 1 < len(rest) else ""
            help_text = getattr(options[opt], "help", "") or ""
            if "|" in value and not _is_option(value):
                for alt in filter(None, value.split("|")):
                    if not re.search(rf"(?<![\w-]){re.escape(alt)}(?![\w-])", help_text):
                        problems.append(f"{opt} {alt!r}: not named in the option's help")
    if not synopsis and not problems and "--help" not in rest:
        try:
            with command.make_context(name, list(rest)):
                pass
        except Exception as exc:  # typer's click: UsageError, BadParameter, ...
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            problems.append(f"`binarize {name}` does not parse it: {message}")
    return problems


def _check_script(args: list[str]) -> list[str]:
    script = REPO / args[0]
    if not script.is_file():
        return [f"script {args[0]} does not exist"]
    source = script.read_text(encoding="utf-8")
    # options may come from a sibling module the script imports (`from bench_x import ...`)
    for module in re.findall(r"^from (\w+) import", source, flags=re.M):
        sibling = script.parent / f"{module}.py"
        if sibling.is_file():
            source += sibling.read_text(encoding="utf-8")
    return [
        f"{args[0]} defines no option {opt}"
        for opt in (a.split("=", 1)[0] for a in args[1:] if a.startswith("--"))
        if f'"{opt}"' not in source and f"'{opt}'" not in source
    ]


def _check_make(targets: list[str]) -> list[str]:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    defined = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    return [
        f"Makefile has no target {t!r}"
        for t in targets
        if not t.startswith("-") and "=" not in t and t not in defined
    ]


def _check_pip(args: list[str]) -> list[str]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"].get(
        "optional-dependencies", {}
    )
    problems = []
    for arg in args:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if match:
            problems += [
                f"pyproject.toml has no extra {extra!r}"
                for extra in match.group(1).split(",")
                if extra not in extras
            ]
    return problems


def _check_paths(tokens: tuple[str, ...]) -> list[str]:
    problems = []
    for token in tokens:
        for part in re.split(r"[=:]", token):
            match = REPO_PATH.fullmatch(part)
            if match and not any(c in part for c in "<>*") and not (REPO / part).exists():
                problems.append(f"{part} does not exist in the repository")
    return problems


def static_problems(cmd: DocCommand) -> list[str]:
    tokens = list(cmd.tokens)
    start = _program_index(tokens, any_program=True)
    assert start is not None
    prog, args = tokens[start], tokens[start + 1 :]
    synopsis = _is_synopsis(cmd)
    problems = _check_paths(cmd.tokens)
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else ""
    if prog == "binarize":
        problems += _check_binarize(args, synopsis)
    elif prog in PYTHONS | {"torchrun"} and module == "binarize_cli":
        problems += _check_binarize(args[args.index("-m") + 2 :], synopsis)
    elif prog in PYTHONS and module == "pytest":
        files = [a.split("::")[0] for a in args if a.split("::")[0].endswith(".py")]
        problems += [f"{f} does not exist" for f in files if not (REPO / f).is_file()]
    elif prog in PYTHONS and args and args[0].endswith(".py"):
        problems += _check_script(args)
    elif prog == "make":
        problems += _check_make(args)
    elif prog in {"pip", "pip3"}:
        problems += _check_pip(args)
    return problems


def test_docs_have_commands():
    """The extraction itself works: a broken parser must not make everything pass."""
    assert len(COMMANDS) >= 30
    files = {cmd.file for cmd in COMMANDS}
    assert {"README.md", "docs/getting-started.md", "docs/reliability.md"} <= files
    texts = {cmd.text for cmd in COMMANDS}
    # a `\` continuation, an indented block line with a comment, an inline span
    assert any(t.endswith("--recipe recipes/resnet50-pa-m4n5.toml") for t in texts)
    assert "binarize report --paper" in texts
    assert "python benchmarks/make_page.py --run all" in texts


SAMPLE = """\
Intro with `binarize report --json` and `make` and `binarize`.

```bash
binarize export --target packed   # a comment
ls -la
```

```console
$ binarize --version
binarize 0.1.0
```

```python
import os
```

    binarize convert resnet18 \\
        --data fake
    u_k = mean(W) + c_k * std(W)

$ python -c 'print(1)'
"""


def test_extraction_rules():
    found = [(c.line, c.text, c.inline) for c in extract_text("x.md", SAMPLE)]
    assert found == [
        (1, "binarize report --json", True),
        (4, "binarize export --target packed", False),
        (5, "ls -la", False),  # any program in a shell block: unclassified, so it fails
        (9, "binarize --version", False),
        (17, "binarize convert resnet18 --data fake", False),
        (21, "python -c print(1)", False),
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("binarize exprt --target onnx", "no subcommand 'exprt'"),
        ("binarize export --format onnx", "has no option --format"),
        ("binarize --verbose report", "has no option --verbose"),
        ("binarize export [RUN_DIR] --target onnx|tflite", "'tflite': not named"),
        ("binarize report --compare", "does not parse"),
        ("binarize convert x --recipe recipes/nope.toml", "recipes/nope.toml does not exist"),
        ("python benchmarks/bench_onnx.py --warmup 3", "defines no option --warmup"),
        ("python benchmarks/nope.py", "does not exist"),
        ("python -m pytest tests/test_nope.py", "does not exist"),
        ("torchrun --nproc_per_node 2 -m binarize_cli convert x --epoch 1", "no option --epoch"),
        ("make demoo", "no target 'demoo'"),
        ("pip install -e .[dev]", "no extra 'dev'"),
    ],
)
def test_static_checks_catch_mistakes(text: str, problem: str):
    (cmd,) = extract_text("x.md", f"$ {text}\n")
    assert any(problem in p for p in static_problems(cmd)), static_problems(cmd)


def test_unknown_command_is_unclassified():
    (cmd,) = extract_text("x.md", "```sh\nbinarize report runs/other --json\n```\n")
    assert classify(cmd)[0] == "unclassified"


def test_every_classification_is_used():
    texts = [cmd.text for cmd in COMMANDS]
    assert [c for c in CHEAP if c not in texts] == []
    assert [c for c in NOT_COMMANDS if c not in texts] == []
    assert [p for p in EXPENSIVE if not any(re.match(p, t) for t in texts)] == []


def test_repository_paths_in_prose_exist():
    """`recipes/...`, `tests/...` and the like in code spans name files that exist."""
    missing = []
    for path in DOC_FILES:
        for match in re.finditer(r"`([^`\s]+)`", path.read_text(encoding="utf-8")):
            name = match.group(1).rstrip(".,:;")
            if REPO_PATH.fullmatch(name) and not (REPO / name).exists():
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert missing == []


#: Pages that quote no hand-copied run figures: each figure there is checked by a CHEAP command.
FIGURE_PAGES = ("README.md", "docs/getting-started.md")
#: A measured-looking figure: two or more decimals (``98.06``, ``1.81e9``) or a percentage.
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d{2,}(?:e\d+)?%?|(?:\.\d+)?%)")
#: Figure-like numbers that are no measurement -> what they are.
NOT_FIGURES = {"3.11": "the Python version README.md asks for"}


def test_readme_and_guide_quote_only_checked_figures():
    """Docs carry no hand-copied figures that can drift: every figure in README.md and the
    getting-started guide is one a CHEAP command's output is checked for (measured figures
    live in docs/benchmarks.md, generated by benchmarks/make_page.py)."""
    checked = {text for spec in CHEAP.values() for text in spec.stdout}
    unchecked = [
        f"{page}: {m.group(0)}"
        for page in FIGURE_PAGES
        for m in FIGURE.finditer((REPO / page).read_text(encoding="utf-8"))
        if m.group(0) not in checked and m.group(0) not in NOT_FIGURES
    ]
    assert unchecked == []
    assert FIGURE.findall("got 98.06% then 97.5% and 1.81e9, 5.5 GB, v0.1.0") == [
        "98.06%",
        "97.5%",
        "1.81e9",
    ]


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_command_is_valid(cmd: DocCommand):
    kind, _ = classify(cmd)
    if kind == "unclassified":
        pytest.fail(
            f"{cmd.where}: `{cmd.text}` is neither run nor classified: add it to CHEAP in "
            "tests/cli/test_docs_commands.py, or to EXPENSIVE with the reason it is not run"
        )
    if kind == "not-a-command":
        return
    problems = static_problems(cmd)
    assert not problems, f"{cmd.where}: `{cmd.text}`: " + "; ".join(problems)


# --- running the cheap ones ------------------------------------------------------------------


def _cheap_params() -> list:
    first: dict[str, DocCommand] = {}  # named after the first code block showing it, if any
    for cmd in sorted(COMMANDS, key=lambda c: c.inline):
        if classify(cmd)[0] == "cheap":
            first.setdefault(cmd.text, cmd)
    return [
        pytest.param(
            cmd.text, id=cmd.where, marks=[pytest.mark.slow] if CHEAP[cmd.text].slow else []
        )
        for cmd in first.values()
    ]


def _argv(tokens: list[str]) -> list[str]:
    prog, args = tokens[0], tokens[1:]
    if prog == "binarize":
        script = Path(sys.executable).with_name("binarize")
        return (
            [str(script), *args]
            if script.is_file()
            else [sys.executable, "-m", "binarize_cli", *args]
        )
    if prog in PYTHONS:
        return [sys.executable, *args]
    raise AssertionError(f"do not know how to run {prog!r}")


def _env() -> dict[str, str]:
    # BINARIZE_CACHE: the test's own cache (conftest.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("BINARIZE_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real run directory of a tiny model (calibration only) and its packed export.

    Made in this process (torch is imported already): the commands under test run in fresh ones.
    """
    root = tmp_path_factory.mktemp("docs-run")
    run, packed = root / RUN, root / "model.packed.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BINARIZE_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        main(
            ["convert", "test_resnet", "--data", "digits", "--epochs", "0",
             "--baseline-epochs", "0", "--calib-batches", "1", "-o", str(run)]
        )  # fmt: skip
        main(["export", str(run), "--target", "packed", "-o", str(packed)])
    return run, packed


@pytest.mark.parametrize("text", _cheap_params())
def test_cheap_command_runs(text: str, request: pytest.FixtureRequest, tmp_path: Path):
    spec = CHEAP[text]
    cwd = tmp_path / "work"
    cwd.mkdir()
    if spec.setup:
        run, packed = request.getfixturevalue("pristine_run")
        shutil.copytree(run, cwd / "runs" / RUN)
        if spec.setup == "packed":
            shutil.copy2(packed, cwd / "runs" / RUN / packed.name)
    tokens = [t.replace("<run>", RUN) for t in _tokens(text)]
    proc = subprocess.run(
        _argv(tokens), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    where = [cmd.where for cmd in COMMANDS if cmd.text == text]
    context = (
        f"`{text}` (shown at {', '.join(where)})\n"
        f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    )
    assert proc.returncode == spec.rc, context
    for expected in spec.stdout:
        assert expected in proc.stdout, f"missing {expected!r} in the output of {context}"
    for path in spec.creates:
        assert (cwd / path).is_file(), f"{path} not written by {context}"
