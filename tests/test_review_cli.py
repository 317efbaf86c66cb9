"""The CLI tried the way a hostile user would, after the library-first refactor (issue 11)."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import run_fail

from eca_surgery.cli import FLAGS
from eca_surgery.errors import with_flags


def test_backticks_in_user_text_are_not_rewritten_as_flags(tmp_path: Path, monkeypatch) -> None:
    """with_flags rewrites the library's `name` mentions; a path or model name the user gave
    that holds backticks is shown as written, not as a flag the user never passed."""
    monkeypatch.chdir(tmp_path)
    message = run_fail(["convert", "seresnet18", "-r", "`force`.yaml", "-o", "x.safetensors"], tmp_path)
    assert "'`force`.yaml'" in message and "--force" not in message
    message = run_fail(["inspect", "seres`seed=1`"], tmp_path)
    assert "'seres`seed=1`'" in message and "--seed" not in message
    (tmp_path / "a`seed`.yaml").write_text("rules: []\n")  # shown unquoted: 'Invalid recipe (PATH, line 1)'
    message = run_fail(["recipe", "check", "a`seed`.yaml"], tmp_path)
    assert "a`seed`.yaml" in message and "--seed" not in message


def test_with_flags_leaves_quoted_and_kept_text() -> None:
    message = (
        "Output 'a `force` b' exists; pass `force` or `init='fit-se'`; read c`seed`d and the model's `seed`."
    )
    assert with_flags(message, FLAGS, keep=["c`seed`d"]) == (
        "Output 'a `force` b' exists; pass --force or --init fit-se; read c`seed`d and the model's --seed."
    )
