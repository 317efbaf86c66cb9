"""A spy for tests that count how often the code under test calls something."""

from __future__ import annotations


def counting(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` for this test by a wrapper that records each call's
    positional arguments (returned, filled as calls happen) and calls through."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
