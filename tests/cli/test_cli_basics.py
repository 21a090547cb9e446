"""The CLI shell: five commands, --version, one-line errors with the contract's exit codes."""

from __future__ import annotations

from typer.testing import CliRunner

from binarize_cli import __version__
from binarize_cli.cli import app

runner = CliRunner()


def test_help_lists_the_five_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "report", "export", "verify", "run"):
        assert command in result.output


def test_each_command_has_help():
    for command in ("convert", "report", "export", "verify", "run"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_python_dash_m_works(binarize_process):
    proc = binarize_process("--version", timeout=120)
    assert proc.returncode == 0
    assert __version__ in proc.stdout


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, binarize_process):
    proc = binarize_process(
        "export", str(tmp_path / "nope"), "--target", "packed", cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("binarize: error:")
    assert list(tmp_path.iterdir()) == []


def test_unknown_export_target_is_bad_input(tmp_path, binarize_process):
    proc = binarize_process("export", "--target", "tflite", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "tflite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_usage_error_is_exit_2_one_line(tmp_path, binarize_process):
    proc = binarize_process("convert", "resnet18", "-M", "notanumber", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
