"""Per-model scan functions that crash, hang or run out of memory, for the scan's worker tests.

They live in a module of their own so that worker processes can import them by name.
"""

from __future__ import annotations

import os
import signal
import time

from eca_surgery.scan import scan_model


def faulty_scan(name: str, flops: bool = True):
    """``scan_model``, but the names ``crash``, ``segfault``, ``hang`` and ``memory`` do what they say."""
    if name == "crash":
        os._exit(3)
    if name == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if name == "hang":
        time.sleep(600)
    if name == "memory":
        raise MemoryError("test")
    return scan_model(name, flops)
