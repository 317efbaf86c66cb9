"""Run one task per name over worker processes that may crash or hang.

Each worker imports once and takes names one at a time over its own pipe, so the parent
always knows which name a worker is on: a worker that dies (a segfault, ``os._exit``, the
kernel's out-of-memory kill) or runs past the timeout costs only that name, reported as a
:class:`Crashed` result, and is replaced. Workers start from a fork server that has already
imported the ``preload`` modules where the platform has one (POSIX), so a replacement starts
in milliseconds; elsewhere they are spawned. Workers ignore Ctrl-C: the parent stops them.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from .errors import SurgeryError

READY = "ready"
MAX_START_FAILURES = 3
MAX_WAIT = 60.0  # the longest one wait for the workers may be (select rejects huge ones)


@dataclass(frozen=True)
class Crashed:
    """A name whose worker died or hung; ``reason`` says which."""

    reason: str


@dataclass
class _Worker:
    process: Any  # a multiprocessing process of the pool's context
    conn: Connection
    since: float  # when it started, or was given its name
    name: str | None = None  # the name it is working on
    ready: bool = False


def _serve(conn: Connection, task: Callable[[str], Any]) -> None:
    """A worker's loop: ``task(name)`` for each name received, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(READY)
    while True:
        try:
            name = conn.recv()
        except (EOFError, OSError):
            return
        if name is None:
            return
        conn.send((name, task(name)))


def _context(preload: list[str]) -> Any:
    """The fork server's context, preloading ``preload`` once for every worker, where the
    platform has one; else spawn's."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(preload)
        return ctx
    return multiprocessing.get_context("spawn")


def warm_up(preload: list[str]) -> None:
    """Start the fork server (where the platform has one) now, so that its imports of
    ``preload`` run while this process does other work; workers started later fork from it."""
    _start_server(_context(preload))


def _start_server(ctx: Any) -> None:
    """Start ``ctx``'s fork server (where it has one) with SIGINT ignored, which it keeps
    (Python installs no KeyboardInterrupt handler then): a Ctrl-C to the process group
    while it imported the preload modules was a KeyboardInterrupt traceback from it, below
    this process's own message. SIGINT is blocked here meanwhile, so a Ctrl-C that comes
    as the server starts is this process's once the handler is back, not lost."""
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        forkserver.ensure_running()  # signal handlers are the main thread's to change
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _start(ctx: Any, task: Callable[[str], Any]) -> _Worker:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, task), daemon=True, name="eca-surgery-worker")
    process.start()
    child.close()
    return _Worker(process, parent, time.monotonic())


def _stop(worker: _Worker) -> None:
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join()
    worker.conn.close()


def _death(process: Any) -> str:
    process.join(1)
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"its worker process was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"its worker process exited with code {code}"


class WorkerPool:
    """``jobs`` workers running ``task`` (a picklable callable: a module-level function or a
    ``functools.partial`` of one) on names, each name given at most ``timeout`` seconds."""

    def __init__(self, task: Callable[[str], Any], jobs: int, timeout: float, preload: list[str]) -> None:
        self.task, self.jobs, self.timeout = task, jobs, timeout
        self.ctx = _context(preload)
        self.workers: list[_Worker] = []
        self.start_failures = 0

    def run(
        self, names: Iterable[str], on_start: Callable[[str], None] | None = None
    ) -> Iterator[tuple[str, Any]]:
        """``(name, task(name))`` for every name, in the order they finish; a
        :class:`Crashed` in place of the result where the worker died or hung."""
        todo = deque(names)
        _start_server(self.ctx)
        try:
            self.workers = [_start(self.ctx, self.task) for _ in range(min(self.jobs, len(todo)))]
            while self.workers and (todo or any(w.name is not None for w in self.workers)):
                self._assign(todo, on_start)
                ready = set(wait(self._waitables(), timeout=self._wait_time()))
                for worker in list(self.workers):
                    yield from self._check(worker, ready, todo)
        finally:
            for worker in self.workers:
                _stop(worker)
            self.workers = []

    def _assign(self, todo: deque[str], on_start: Callable[[str], None] | None) -> None:
        for worker in self.workers:
            if worker.ready and worker.name is None and todo:
                worker.name, worker.since = todo.popleft(), time.monotonic()
                worker.conn.send(worker.name)
                if on_start is not None:
                    on_start(worker.name)

    def _waitables(self) -> list[Any]:
        return [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]

    def _wait_time(self) -> float:
        """Seconds until the first worker runs out of time (starting ones included)."""
        deadlines = [w.since + self.timeout for w in self.workers if w.name is not None or not w.ready]
        until = min(deadlines) - time.monotonic() if deadlines else self.timeout
        return min(max(0.0, until), MAX_WAIT)  # a huge (or infinite) timeout: wait again

    def _check(self, worker: _Worker, ready: set[Any], todo: deque[str]) -> Iterator[tuple[str, Any]]:
        """Take ``worker``'s message, or replace it where it died or ran out of time."""
        if worker.conn in ready or (worker.process.sentinel in ready and worker.conn.poll()):
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                yield from self._replace(worker, todo, _death(worker.process))
                return
            if message == READY:
                worker.ready = True
            else:
                worker.name = None
                yield message
        elif worker.process.sentinel in ready:
            yield from self._replace(worker, todo, _death(worker.process))
        elif time.monotonic() - worker.since > self.timeout:
            what = (
                f"it ran past the {self.timeout:g} s timeout" if worker.ready else "its worker did not start"
            )
            yield from self._replace(worker, todo, what)

    def _replace(self, worker: _Worker, todo: deque[str], reason: str) -> Iterator[tuple[str, Any]]:
        """Stop ``worker``, report its name as crashed, and start another while work remains."""
        _stop(worker)
        self.workers.remove(worker)
        if worker.name is not None:
            yield worker.name, Crashed(reason)
        elif not worker.ready:
            self.start_failures += 1
            if self.start_failures >= MAX_START_FAILURES:
                raise SurgeryError(
                    f"The worker processes could not start ({reason}). Run with `jobs=1` to work in this process."
                )
        if todo:
            self.workers.append(_start(self.ctx, self.task))
