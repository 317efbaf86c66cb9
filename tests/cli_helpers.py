"""Running the real CLI in tests: expecting success, or a clean user error that writes nothing."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from eca_surgery.cli import app

runner = CliRunner()


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (hidden ones included) with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def text_of(result) -> str:
    return "\n".join(filter(None, (result.output, result.stdout, result.stderr)))


def run_ok(args: list[str]) -> str:
    """Run the CLI, expecting success; return its stdout."""
    result = runner.invoke(app, args)
    assert result.exit_code == 0, text_of(result)
    return result.stdout


def run_fail(args: list[str], workdir: Path, output: Path | None = None) -> str:
    """Run the CLI, expecting a clean user error; return the error message, whitespace-normalised.

    Asserts exit code 1 raised by the CLI itself (not an uncaught exception that CliRunner
    swallowed), no traceback, and that nothing in ``workdir`` was created or modified.
    """
    before = listing(workdir)
    result = runner.invoke(app, args)
    text = text_of(result)
    assert result.exit_code == 1, text
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{text}"
    assert "Traceback" not in text
    assert listing(workdir) == before, "the failed command created or changed files"
    if output is not None:
        assert not output.exists()
    assert "Error:" in result.stderr
    return " ".join(result.stderr.split())


def run_usage_error(args: list[str], workdir: Path) -> str:
    """Run the CLI, expecting a usage error (a bad choice or a number out of bounds, which
    typer refuses itself: exit code 2) that writes nothing; return the message, whitespace-
    normalised and without the box typer draws around it."""
    before = listing(workdir)
    result = runner.invoke(app, args)
    text = text_of(result)
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert listing(workdir) == before, "the failed command created or changed files"
    return " ".join(result.stderr.replace("│", " ").split())
