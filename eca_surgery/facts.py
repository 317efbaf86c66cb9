"""What meta-device work found out about one model build, kept across processes.

A model built by name with given kwargs is the same architecture in every process that has
the same timm, torch, torchvision and eca-surgery versions. So what ``convert`` learns about it
on the meta device holds for the next run too: the original's forward pass (output shape and
MACs, per module) and, for each timm-native candidate, whether timm builds it and the digest
of its key -> shape map. Each build has one small file in the user's cache folder (see
``cache``), named and keyed by model, kwargs and versions.

Every entry is checked on reading and one that is not of the expected form reads as unknown,
so that a corrupt or foreign file costs a recomputation, never a wrong answer of another
shape; kwargs that JSON cannot spell exactly (an object, NaN) leave the build uncached.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass
from typing import Any

from .cache import CacheFile, cache_dir, cache_key, source_of
from .checks import MetaPass

PASS = "pass"
NATIVE_PREFIX = "native:"
UNKNOWN = object()  # a candidate nobody has tried yet (None: timm cannot build it)


def shapes_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    """A digest of a key -> shape map, equal for equal maps whatever their order."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def spelled(value: Any) -> str | None:
    """``value`` as canonical JSON, or None where JSON cannot spell it exactly: an object, NaN,
    or a value that reads back as another (a tuple as a list), or one nested too deep to spell."""
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
        return text if json.loads(text) == value else None
    except (TypeError, ValueError, RecursionError):
        return None


@dataclass
class BuildFacts:
    """The cached facts of one build (``file`` None: not cached, every lookup misses)."""

    file: CacheFile | None

    @classmethod
    def of(cls, name: str, kwargs: dict[str, Any]) -> BuildFacts:
        """The facts of ``name`` (a timm or ``torchvision:`` name) built with ``kwargs``."""
        if spelled(kwargs) is None:
            return cls(None)
        key = cache_key(source_of(name), "build", kwargs=kwargs, model=name)
        return cls(CacheFile.open(cache_dir(), key))

    def meta_pass(self) -> MetaPass | None:
        """The original's full pass (shape and MACs) as an earlier run saw it, or None."""
        entry = self.file.entries.get(PASS) if self.file is not None else None
        return _meta_pass_of(entry) if isinstance(entry, dict) else None

    def remember_pass(self, found: MetaPass) -> None:
        """Keep a full pass (shape checked, MACs counted or their reason) for later runs."""
        if self.file is None or found.shape is None or (found.macs is None and found.why is None):
            return
        modules = {k: v for k, v in found.modules.items() if v}
        entry = {"shape": found.shape, "macs": found.macs, "why": found.why, "scope": found.scope}
        self._put(PASS, entry | {"modules": modules})

    def native(self, candidate: dict[str, Any]) -> str | None | object:
        """The shapes digest of timm's build of ``candidate`` kwargs, None where timm cannot
        build it, or ``UNKNOWN``."""
        text = spelled(candidate)
        if self.file is None or text is None:
            return UNKNOWN
        entry = self.file.entries.get(NATIVE_PREFIX + text, UNKNOWN)
        return entry if entry is None or _is_digest(entry) else UNKNOWN

    def remember_native(self, candidate: dict[str, Any], digest: str | None) -> None:
        text = spelled(candidate)
        if self.file is not None and text is not None:
            self._put(NATIVE_PREFIX + text, digest)

    def _put(self, name: str, value: Any) -> None:
        """Add an entry and write the file now (a folder that cannot be written leaves it uncached)."""
        self.file.put(name, value)
        self.file.save()


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


MAX_COUNT = 2**62  # far above any model's MACs; a report divides them as floats


def _count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def _is_shape(value: Any) -> bool:
    """A shape (a list of sizes) or a list of shapes, as ``checks.shape_of`` gives them."""
    if not isinstance(value, list):
        return False
    return all(map(_count, value)) or all(isinstance(v, list) and all(map(_count, v)) for v in value)


def _meta_pass_of(entry: dict[str, Any]) -> MetaPass | None:
    """The pass an entry records, or None unless every field has its form."""
    shape, macs, why, scope, modules = (entry.get(k) for k in ("shape", "macs", "why", "scope", "modules"))
    if not (_is_shape(shape) and (macs is None or _count(macs)) and (why is None or isinstance(why, str))):
        return None
    if not isinstance(scope, str) or not isinstance(modules, dict) or not all(map(_count, modules.values())):
        return None
    if any(v > (macs or 0) for v in modules.values()):  # no module counts more than the whole
        return None
    return MetaPass(shape, macs, why, scope, dict(modules))
