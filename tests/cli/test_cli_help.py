"""Help and option behaviour shared by every command: defaults shown, ``-h``, no type tag on
flags, 80-column wrapping, case-insensitive choices."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from binarize_cli.cli import app
from binarize_cli.commands import _common
from binarize_cli.commands.convert import SCHEME_DEFAULTS

runner = CliRunner()
CLI = typer.main.get_command(app)
COMMANDS = sorted(CLI.commands)  # type: ignore[attr-defined]


def _help(*args: str, columns: int = 80) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_listed_and_the_listing_fits_80_columns():
    text = _help()
    for command in COMMANDS:
        assert f"  {command} " in text
    assert "runs" in COMMANDS
    assert max(len(line) for line in text.splitlines()) <= 80
    commands = text[text.index("Commands:") :]
    assert "..." not in commands  # each one-line summary is whole


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help(command):
    args = [] if command is None else [command]
    short = runner.invoke(app, [*args, "-h"], env={"COLUMNS": "80"})
    assert short.exit_code == 0, short.output
    assert short.output == _help(*args)
    assert "Usage:" in short.output and "-h, --help" in short.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_has_no_bool_tag(command):
    text = _help(command)
    assert "<bool>" not in text and "bool" not in text
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_its_default(command):
    """Each option that takes a value, and each --x/--no-x switch, says its default;
    a plain on/off flag (``--json``, ``--resume``) is off unless given."""
    cmd = CLI.commands[command]  # type: ignore[attr-defined]
    text = " ".join(_help(command, columns=10_000).split())
    ctx = cmd.make_context(command, ["--help"], resilient_parsing=True)
    params = cmd.get_params(ctx)
    starts = sorted(
        re.search(rf"(?<=\s){re.escape(p.opts[0])}(?=[\s,])", text).start()  # type: ignore[union-attr]
        for p in params
        if p.param_type_name == "option"
    )
    for param in params:
        if "--help" in param.opts or getattr(param, "required", False):
            continue
        if getattr(param, "is_flag", False) and not param.secondary_opts:
            continue
        name = param.opts[-1]
        start = text.index(name) if param.param_type_name == "option" else text.index("Arguments")
        end = min([s for s in starts if s > start] + [len(text)])
        entry = text[start:end]  # this option's own entry, up to the next option
        assert "[default:" in entry, (command, name, entry)


def test_scheme_defaults_shown_in_help_match_the_registry():
    from binarize_cli.quant.base import available_schemes, get_scheme

    registry = {s: (get_scheme(s).default_m, get_scheme(s).default_n) for s in available_schemes()}
    assert registry == SCHEME_DEFAULTS


@pytest.mark.parametrize(
    ("value", "expected"),
    [("PA", "pa"), (" Onnx-Float ", "onnx-float"), ("numpy", "numpy"), (None, None)],
)
def test_lower_choice(value, expected):
    assert _common.lower_choice(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("DIGITS", "digits"), ("ImageFolder:/Data/Cats", "imagefolder:/Data/Cats"), (None, None)],
)
def test_data_spec_lowers_the_name_only(value, expected):
    assert _common.data_spec(value) == expected


def test_choices_are_case_insensitive_in_every_command(tmp_path, monkeypatch):
    """Upper-case choices reach the commands lower-cased: an unknown target would be
    refused first, so the missing run directory is what each call reports."""
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nope")
    for args in (
        ["export", missing, "--target", "ONNX"],
        ["export", missing, "--target", "Packed"],
        ["verify", missing, "--data", "DIGITS"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        assert "does not exist" in str(result.exception), (args, result.exception)
    refused = runner.invoke(app, ["export", missing, "--target", "TFLITE"])
    assert "unknown export target 'tflite'" in str(refused.exception)
    seen = {}

    def fake_evaluate(path, data, **kw):
        seen.update(data=data, backend=kw["backend"])
        raise SystemExit(0)

    monkeypatch.setattr("binarize_cli.export.packed.evaluate_packed_file", fake_evaluate)
    runner.invoke(app, ["run", "x.safetensors", "--kernel", "NumPy", "--data", "Digits"])
    assert seen == {"data": "digits", "backend": "numpy"}


def test_analytic_report_accepts_an_upper_case_scheme():
    import json

    result = runner.invoke(
        app,
        [
            "report",
            "timm:test_resnet",
            "--scheme",
            "PA",
            "-M",
            "2",
            "-N",
            "2",
            "--input-size",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["scheme"] == "pa"


def test_console_width_follows_columns_at_print_time(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert _common.console.width == 80
    monkeypatch.setenv("COLUMNS", "123")
    assert _common.console.width == 123
    monkeypatch.delenv("COLUMNS")
    if not _common.console.is_terminal:
        assert _common.console.width == _common.PIPE_WIDTH
