"""The cache in the user's cache folder: each model's scan outcome, each pattern's model list,
and what convert's meta-device work found out about a model build (``facts``).

One JSON file per source (timm, torchvision) and versions (and for build facts, per model
and kwargs): a re-scan of the whole zoo reads one file and imports neither torch nor timm.
The file's key (the timm, torch, torchvision and eca-surgery versions, the source, the model
kwargs and whether MACs were counted) is in its name (a digest) and inside it (checked on
reading). A file that cannot be read or trusted
(corrupt, truncated, too large, of the wrong shape) is ignored and rewritten; a folder that
cannot be written leaves the scan uncached, with one note.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__

CACHE_ENV = "ECA_SURGERY_CACHE"
FORMAT = 1
MAX_BYTES = 64 * 1024 * 1024  # the whole zoo is well under 1 MiB; anything this big is not ours
TORCHVISION_PREFIX = "torchvision:"


def cache_dir() -> Path:
    """``$ECA_SURGERY_CACHE``, else the platform's user cache folder + ``eca-surgery``:
    ``$XDG_CACHE_HOME`` or ``~/.cache`` (Linux), ``~/Library/Caches`` (macOS), ``%LOCALAPPDATA%``
    (Windows)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = str(Path.home() / "Library" / "Caches")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = xdg if os.path.isabs(xdg) else str(Path.home() / ".cache")
    return Path(base) / "eca-surgery"


def _version(package: str) -> str:
    """``package``'s installed version, read from its metadata (no import), or ``none``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def source_of(name: str) -> str:
    """The source of a model name as ``create_model`` takes it: torchvision or timm."""
    return "torchvision" if name.startswith(TORCHVISION_PREFIX) else "timm"


def cache_key(
    source: str,
    what: str,
    flops: bool | None = None,
    kwargs: dict[str, Any] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """What a cached entry depends on: the versions of the code that made it, and how;
    ``what`` the file holds: ``scan`` (outcomes), ``names`` (model lists) or ``build`` (what
    meta-device work found out about one ``model``, see ``facts``)."""
    key = {
        "format": FORMAT,
        "what": what,
        "source": source,
        "eca_surgery": __version__,
        "timm": _version("timm"),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "kwargs": kwargs or {},
        "flops": flops,
    }
    return key if model is None else key | {"model": model}


def _file_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{key['what']}-{key['source']}-{digest}.json"


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing, unreadable, too large or not JSON."""
    from .jsontext import loads_strict

    try:
        with open(_open_regular(path), "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            return None
        return loads_strict(data.decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, an OSError unless it is a regular file: opened
    without blocking, so that a FIFO (or a link to one) named like a cache file never hangs
    the scan, and a device (``/dev/zero``) is never read."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _entries(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The entries of the cache file ``path`` where it is one written for ``key``, else none."""
    data = _read_json(path)
    if isinstance(data, dict) and data.get("key") == key and isinstance(data.get("entries"), dict):
        return {k: v for k, v in data["entries"].items() if isinstance(k, str)}
    return {}


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


@dataclass
class CacheFile:
    """One cache file: str -> a JSON value the caller checks (a model's outcome, a pattern's
    model list). ``dirty`` when something was added (or dropped) since it was read; saving
    merges in what the file holds by then (another scan's entries, or other models' where
    this one was opened with ``refresh``)."""

    path: Path
    key: dict[str, Any]
    entries: dict[str, Any] = field(default_factory=dict)
    dirty: bool = False
    dropped: set[str] = field(default_factory=set)  # names whose entries saving removes

    @classmethod
    def open(cls, folder: Path, key: dict[str, Any], refresh: bool = False) -> CacheFile:
        """The cache file of ``key`` in ``folder``, empty with ``refresh`` or where the file
        is missing, unreadable, or not one this version wrote for ``key``."""
        cache = cls(folder / _file_name(key), key)
        if not refresh:
            cache.entries = _entries(cache.path, key)
        return cache

    def put(self, name: str, value: Any) -> None:
        self.entries[name] = value
        self.dropped.discard(name)
        self.dirty = True

    def drop(self, name: str) -> None:
        """Forget ``name``'s entry, here and (on saving) in the file."""
        self.entries.pop(name, None)
        self.dropped.add(name)
        self.dirty = True

    def save(self) -> str | None:
        """Write the file atomically (a temporary renamed over it) if anything was added;
        a note saying why not where the folder cannot be written, else None."""
        if not self.dirty:
            return None
        from .outputs import temp_path

        # what another scan wrote since (or, with refresh, other models' entries) is kept
        kept = {k: v for k, v in _entries(self.path, self.key).items() if k not in self.dropped}
        self.entries = {**kept, **self.entries}
        body = {"key": self.key, "entries": self.entries}
        tmp = temp_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(body, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            _discard(tmp)
            return (
                f"The scan cache could not be written to {str(self.path.parent)[:200]!r} "
                f"({exc.strerror or exc}); this scan was not cached. Set {CACHE_ENV} to a writable folder."
            )
        except BaseException:  # a signal as it writes, too: no temporary is left behind
            _discard(tmp)
            raise
        self.dirty = False
        return None
