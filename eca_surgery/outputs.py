"""Writing outputs safely: what may be replaced, temporaries, and atomic renames.

Rules every output of the tool follows:

* Only a regular file, or a path that does not exist, is replaced. A symbolic link
  (dangling or not), a directory, a device, a FIFO or a socket is refused, even when
  overwriting is allowed. A file being replaced keeps its mode; a new one gets
  ``0666 & ~umask``.
* A folder output is replaced only if it is an earlier export of this tool (it holds
  the :data:`MARKER` file and nothing but the files that export listed) or is empty, and
  never the current directory or an ancestor of it, the home directory, or ``/``.
* The folder is probed for writability (a file is created and removed in it) and, when
  the size of the output can be estimated, for free space, before any work is done.
* Everything is written under a temporary name beside the target,
  ``.{name}.eca-surgery-tmp-{pid}-{random}``, fsynced and renamed into place. The
  temporary is removed on every exit path the process controls (exceptions,
  KeyboardInterrupt, and SIGTERM where the CLI turns it into one). Temporaries left by
  a killed process (SIGKILL) are removed by the next write to the same place; those of
  a live process are left alone.
* Every file goes through :func:`atomic_write_file` (folders through
  :func:`atomic_write_dir`). Files that must agree with each other are written inside
  :func:`written_together`: all of them are renamed into place as it ends, or none is.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SurgeryError

TMP_TAG = ".eca-surgery-tmp-"
MARKER = ".eca-surgery-export"
_TMP_NAME = re.compile(r"\.(?P<name>.+)" + re.escape(TMP_TAG) + r"(?P<pid>\d+)-[0-9a-f]+")


def current_umask() -> int:
    """The process's umask: read from /proc where the kernel shows it (Linux 4.7+), else by
    setting and restoring it, which leaves a moment where another thread's new files get
    umask 0 (so that is only the fallback)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_path(target: Path) -> Path:
    """A fresh temporary name beside ``target``, recognisable as this process's."""
    return target.parent / f".{_stem(target.name)}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"


def _stem(name: str) -> str:
    """The part of an output's name its temporaries carry (short enough for a 255-byte name)."""
    return name[:200]


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise write_error(path, exc) from None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def write_error(path: Path, exc: OSError) -> SurgeryError:
    """A SurgeryError for an OS error met while writing ``path``, with the OS's reason."""
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "free some space on that filesystem or write elsewhere",
        errno.EDQUOT: "free some space within your quota or write elsewhere",
        errno.EROFS: "that filesystem is read-only; write elsewhere",
    }.get(exc.errno or 0, "check the folder's permissions and attributes, or write elsewhere")
    return SurgeryError(
        f"Could not write {str(path)!r}: {reason} (errno {exc.errno}). Nothing was replaced; {hint}."
    )


def check_folder(target: Path, needed: int | None = None) -> None:
    """Refuse to write ``target`` if its folder cannot take a new file (read-only,
    immutable, a virtual filesystem such as /proc or /sys...) or has clearly too little
    free space for ``needed`` bytes. Probes by creating and removing a temporary there."""
    folder, probe = target.parent, temp_path(target)
    try:
        with _signals_deferred():  # the probe is created and removed with no interrupt between
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.unlink(probe)
    except OSError as exc:
        raise SurgeryError(
            f"Cannot write in folder {str(folder)!r}: {exc.strerror or exc} (errno {exc.errno}). "
            "Nothing was done; choose an output in a writable folder."
        ) from None
    if needed is not None:
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise SurgeryError(
                f"Folder {str(folder)!r} has {free / 1e6:,.1f} MB free, but the output needs about "
                f"{needed / 1e6:,.1f} MB. Nothing was done; free some space or write elsewhere."
            )


def _same_or_inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` (the same name after resolving links, or the same
    file) or lies inside folder ``other``."""
    try:
        if path.exists() and other.exists() and os.path.samefile(path, other):
            return True
        resolved, folder = path.resolve(), other.resolve()
    except (OSError, RuntimeError):  # a link loop: leave it to the checks of each path
        return False
    return resolved == folder or folder in resolved.parents


def check_outputs_apart(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse, before any work, outputs that would replace one of the ``inputs`` (or a
    folder output holding one), and outputs that are the same path or nested in one
    another. Keys describe the paths for the message (``"output"``, ``"checkpoint"``)."""
    named_outputs = [(what, Path(p)) for what, p in outputs.items() if p is not None]
    named_inputs = [(what, Path(p)) for what, p in inputs.items() if p is not None]
    for i, (what, out) in enumerate(named_outputs):
        for other, path in named_inputs:
            if _same_or_inside(path, out):
                raise SurgeryError(
                    f"The {what} {str(out)!r} would replace the {other} {str(path)!r}, which is read "
                    f"as input; nothing was done and it was left untouched. Write the {what} elsewhere."
                )
        for other, path in named_outputs[i + 1 :]:
            if _same_or_inside(path, out) or _same_or_inside(out, path):
                raise SurgeryError(
                    f"The {what} {str(out)!r} and the {other} {str(path)!r} are the same path or one "
                    "holds the other; nothing was done. Give them separate paths."
                )


def _replaceable_file(path: Path, force: bool) -> os.stat_result | None:
    """The lstat of output file ``path`` (None if missing); refuse anything but a regular
    file, and an existing one without ``force``."""
    st = _lstat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise SurgeryError(
            f"Output {str(path)!r} is a directory; give a file name such as model.safetensors."
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise SurgeryError(
            f"Output {str(path)!r} is {_kind(st.st_mode)}, and eca-surgery only ever replaces regular "
            "files (not links, devices, FIFOs or sockets), even when told to overwrite. It was left "
            "untouched; choose another output path."
        )
    if st is not None and not force:
        raise SurgeryError(
            f"Output {str(path)!r} already exists and was left untouched. "
            "Pass `force=True` to overwrite it, or choose another `output`."
        )
    return st


def check_file_output(path: str | Path, force: bool, size: int | None = None) -> Path:
    """Refuse an output file path that may not be written: anything but a regular file or
    a missing path, an existing file without ``force``, a missing or unwritable folder,
    or (with ``size``, an estimate in bytes) a folder without the space."""
    path = Path(path)
    _replaceable_file(path, force)
    if not path.parent.is_dir():
        raise SurgeryError(
            f"The folder of output {str(path)!r} {_missing_folder(path.parent)}; create it first or choose "
            "another `output`."
        )
    check_folder(path, size)
    return path


def _missing_folder(folder: Path) -> str:
    """Why ``folder`` (not a directory) cannot hold an output: missing, or something else."""
    st = _lstat(folder)
    if st is None:
        return "does not exist"
    return f"does not exist: {str(folder)!r} is {_kind(st.st_mode)}, not a folder"


def _protected(path: Path) -> str | None:
    """Why folder ``path`` may never be replaced, or None."""
    try:
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError):  # a symbolic link loop, a removed working directory...
        return "a path that cannot be resolved"
    if resolved == Path(resolved.anchor):
        return "the root folder"
    if resolved == cwd:
        return "the current directory"
    if resolved in cwd.parents:
        return "an ancestor of the current directory"
    home = Path(os.path.expanduser("~")).resolve()
    if resolved == home:
        return "the home directory"
    return None


def _export_files(path: Path, kind: str) -> list[str] | None:
    """The files an earlier export of ``kind`` in ``path`` listed in its marker, or None
    if ``path`` holds no readable marker of that kind."""
    marker = path / MARKER
    st = _lstat(marker)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > 65536:
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if data.get("format") != "eca-surgery" or data.get("kind") != kind or not isinstance(files, list):
        return None
    if not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..") for f in files):
        return None
    return files


def check_dir_output(path: str | Path, force: bool, kind: str, size: int | None = None) -> Path:
    """Refuse an output folder that may not be written.

    Never replaced, even with ``force``: the root, home or current directory or an
    ancestor of it, a symbolic link, anything that is not a folder, and a folder that
    is not empty and not an earlier export of ``kind`` holding only the files it wrote.
    """
    path = Path(path)
    why = _protected(path)
    if why is not None:
        raise SurgeryError(
            f"Output folder {str(path)!r} is {why}; eca-surgery never replaces it. Name a new "
            "folder for the export, e.g. ./model-timm."
        )
    st = _lstat(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise SurgeryError(
            f"Output folder {str(path)!r} exists and is {_kind(st.st_mode)}, not a folder; it was left "
            "untouched. Choose another path for the export."
        )
    if st is not None:
        _check_replaceable_dir(path, kind)  # a folder that is not ours is refused whatever ``force`` says
        if not force:
            raise SurgeryError(
                f"{str(path)!r} already exists and was left untouched; pass `force=True` to replace it."
            )
    if not path.parent.is_dir():
        raise SurgeryError(
            f"The folder that would hold {str(path)!r} {_missing_folder(path.parent)}; create it first."
        )
    check_folder(path, size)
    return path


def _check_replaceable_dir(path: Path, kind: str) -> list[str]:
    """The names in ``path``, if it is empty or an earlier export of ``kind`` with only its own files."""
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise SurgeryError(
            f"Cannot read folder {str(path)!r} ({exc.strerror or exc}), so it cannot be checked and is "
            "not replaced; it was left untouched. Choose a new folder for the export."
        ) from None
    if not names:
        return names
    files = _export_files(path, kind)
    if files is None:
        raise SurgeryError(
            f"Folder {str(path)!r} is not empty and is not an earlier export of eca-surgery (it has no "
            f"{MARKER} marker), so it is never replaced; every file in it was left untouched. "
            "Choose a new folder for the export."
        )
    allowed = set(files) | {MARKER}
    for name in names:
        st = _lstat(path / name)
        if name not in allowed or st is None or not stat.S_ISREG(st.st_mode):
            raise SurgeryError(
                f"Folder {str(path)!r} is an earlier export but also holds {name!r}, which eca-surgery did "
                "not write there, so it is not replaced; every file in it was left untouched. Move that "
                "file out, or choose a new folder for the export."
            )
    return names


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: the pid exists (another user's process)
        return True
    return True


def clean_leftovers(folder: str | Path, name: str) -> list[Path]:
    """Remove the temporaries for output ``name`` in ``folder`` left by processes that are
    no longer running (a SIGKILL mid-write); return what was removed. Those of live
    processes are left alone."""
    folder = Path(folder)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in sorted(entries):
        match = _TMP_NAME.fullmatch(entry)
        if not match or match["name"] != _stem(name) or _pid_alive(int(match["pid"])):
            continue
        path = folder / entry
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def clean_outputs(*paths: str | Path) -> list[Path]:
    """Remove the temporaries of the outputs ``paths`` left by killed runs; return what was removed."""
    return [left for path in map(Path, paths) for left in clean_leftovers(path.parent, path.name)]


def _clean_and_warn(target: Path) -> None:
    for path in clean_leftovers(target.parent, target.name):
        warnings.warn(f"Removed {str(path)!r}, left by an interrupted eca-surgery run.", stacklevel=4)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a short critical step runs (a probe, a cleanup, a
    folder swap), so that no interrupt can cut it short; a signal that arrives meanwhile
    is acted on, by the handler that was in place, once the step is done.

    Blocking the signals in the OS is not enough: a signal that arrived just before may
    already be pending in Python and raise KeyboardInterrupt at any point of the step.
    So Python's handlers are swapped for ones that only record the signal, and an
    interrupt raised while swapping them is recorded too."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed (and signals are only handled) in the main thread
        return
    received: list[int | BaseException] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        while sig not in previous:
            try:
                previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
            except KeyboardInterrupt as exc:  # one that was pending surfaced here
                received.append(exc)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            _redeliver(received[0], previous)


def _redeliver(what: int | BaseException, handlers: dict[int, Any]) -> None:
    """Act on a signal held by :func:`_signals_deferred` as its own handler would have."""
    if isinstance(what, BaseException):
        raise what
    handler = handlers.get(what)
    if callable(handler):
        handler(what, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(what)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
        pass


def _remove(path: Path) -> None:
    with _signals_deferred():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """Remove the temporary ``tmp`` if the block fails, leaving ``path`` as it was; an
    OSError becomes the one-paragraph write error of ``path``."""
    try:
        yield
    except OSError as exc:
        _remove(tmp)
        raise write_error(path, exc) from None
    except BaseException:
        _remove(tmp)
        raise


@dataclass(frozen=True)
class Meanwhile:
    """Work to do while a file is written (a check, say): ``run()``, in a thread of its own;
    ``stop()`` asks it to end early, when a signal (Ctrl-C, SIGTERM) stops the writing."""

    run: Callable[[], Any]
    stop: Callable[[], None] = lambda: None


def atomic_write_file(
    path: str | Path,
    write: Callable[[Path], Any],
    force: bool,
    size: int | None = None,
    meanwhile: Meanwhile | None = None,
    again: Callable[[], bool] = lambda: False,
) -> Path:
    """Write file ``path`` by ``write(temporary_path)``: the one way every file output is written.

    ``path`` is checked first (:func:`check_file_output`); the temporary beside it is
    fsynced, given the mode (the replaced file's, or ``0666 & ~umask``) and renamed over
    ``path`` (inside :func:`written_together`, when that block ends). On any exception it
    is removed and ``path`` is left as it was; an OSError becomes a SurgeryError naming
    ``path`` and the OS's reason. ``meanwhile`` (a check, say) runs in another thread while
    this one writes; ``path`` is replaced only if both succeed, and after ``write`` runs again
    if ``again()`` then says what was written has changed meanwhile."""
    path = check_file_output(path, force, size)
    _clean_and_warn(path)
    tmp = temp_path(path)
    with _removed_on_failure(tmp, path):
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        _write_meanwhile(write, tmp, meanwhile)
        if again():
            write(tmp)
        _ready(tmp, path, force)
        group = _GROUP.get()
        if group is None:
            _rename_all([_Staged(tmp, path, force)])
        else:
            group.append(_Staged(tmp, path, force))
    return path


def _write_meanwhile(write: Callable[[Path], Any], tmp: Path, meanwhile: Meanwhile | None) -> None:
    """``write(tmp)``; with ``meanwhile`` running in a thread of its own as this one writes
    (safetensors lets go of the GIL as it writes, and a check's tensor kernels do too). The
    writing stays in the calling thread: a writer in a second thread wrote a 358 MiB file to
    this machine's disk about 0.3 s slower (see the README's speed section). The first failure
    is raised once both have ended: the write's, else ``meanwhile``'s."""
    if meanwhile is None:
        write(tmp)
        return
    failed: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            meanwhile.run()
        except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="eca-surgery-meanwhile", daemon=True).start()
    try:
        write(tmp)
    except BaseException:  # a failed write, or a signal that came as it wrote: the check is moot
        meanwhile.stop()
        raise
    finally:
        _wait(done, meanwhile.stop)
    if failed:
        raise failed[0]


def _wait(done: threading.Event, stop: Callable[[], None]) -> None:
    """Wait for the thread beside the writing to say it is ``done``, also when a signal (Ctrl-C,
    SIGTERM) interrupts the wait: the thread is asked to ``stop`` and the signal's exception is
    raised once it has, since a thread still inside native code (torch) when the interpreter
    exits may abort the process. (An interrupted ``Thread.join`` may report a running thread
    as ended, so it is not used.)"""
    stopped: BaseException | None = None
    while not done.is_set():
        try:
            done.wait(0.1)  # a signal delivered to the other thread wakes no one: look again soon
        except BaseException as exc:  # noqa: BLE001 - raised again below
            if stopped is None:
                stop()
            stopped = stopped or exc
    if stopped is not None:
        raise stopped


@dataclass(frozen=True)
class _Staged:
    """A file written under temporary name ``tmp``, waiting to be renamed over ``path``."""

    tmp: Path
    path: Path
    force: bool


_GROUP: ContextVar[list[_Staged] | None] = ContextVar("eca_surgery_written_together", default=None)


@contextmanager
def written_together() -> Iterator[None]:
    """Rename the files :func:`atomic_write_file` writes in this block into place together
    as it ends, or none of them: if the block (or a final check) fails, every temporary is
    removed and every target left as it was. For outputs that must agree with each other,
    such as a healed checkpoint and its optimizer state. A nested block joins the outer one."""
    if _GROUP.get() is not None:
        yield
        return
    staged: list[_Staged] = []
    token = _GROUP.set(staged)
    try:
        try:
            yield
        finally:
            _GROUP.reset(token)
        _rename_all(staged)
    except BaseException:
        for s in staged:
            _remove(s.tmp)
        raise


def _ready(tmp: Path, path: Path, force: bool) -> None:
    """Give the written temporary ``tmp`` its final mode and fsync it."""
    st = _replaceable_file(path, force)  # again: it may have changed meanwhile
    os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~current_umask())
    _fsync(tmp)


def _rename_all(staged: list[_Staged]) -> None:
    """Rename each temporary over its target, in order, once all targets are checked again
    (still replaceable), with no interrupt between the renames."""
    for s in staged:
        _replaceable_file(s.path, s.force)
    with _signals_deferred():
        for s in staged:
            try:
                os.replace(s.tmp, s.path)
            except OSError as exc:
                raise write_error(s.path, exc) from None
    for folder in dict.fromkeys(s.path.parent for s in staged):
        _fsync_dir(folder)


def atomic_write_dir(
    path: str | Path, write: Callable[[Path], Any], force: bool, kind: str, size: int | None = None
) -> Path:
    """Write folder ``path`` by ``write(temporary_folder)``, mark it as an export of
    ``kind`` and rename it into place. An earlier export (or an empty folder) at ``path``
    is renamed aside first and removed, file by file, only once the new one is in place."""
    path = check_dir_output(path, force, kind, size)
    _clean_and_warn(path)
    tmp = temp_path(path)
    with _removed_on_failure(tmp, path):
        os.mkdir(tmp, 0o777)
        write(tmp)
        files = sorted(os.listdir(tmp))
        (tmp / MARKER).write_text(
            json.dumps({"format": "eca-surgery", "kind": kind, "version": 1, "files": files}) + "\n"
        )
        _set_modes(tmp, path, (*files, MARKER))
        for name in (*files, MARKER):
            _fsync(tmp / name)
        _fsync(tmp)
        _swap_in(tmp, path, force, kind)
    return path


def _set_modes(tmp: Path, path: Path, names: tuple[str, ...]) -> None:
    """Give the folder and files in ``tmp`` the modes of those they replace in ``path``,
    else the modes mkdir and open give (``0777``/``0666 & ~umask``)."""
    umask = current_umask()

    def mode(old: Path, default: int) -> int:
        st = _lstat(old) if _lstat(path) is not None else None
        return stat.S_IMODE(st.st_mode) if st is not None else default & ~umask

    os.chmod(tmp, mode(path, 0o777))
    for name in names:
        os.chmod(tmp / name, mode(path / name, 0o666))


def _swap_in(tmp: Path, path: Path, force: bool, kind: str) -> None:
    """Rename folder ``tmp`` to ``path``; an existing (replaceable) ``path`` goes aside first."""
    if _lstat(path) is None:
        os.rename(tmp, path)  # fails, changing nothing, if something appeared there meanwhile
        _fsync_dir(path.parent)
        return
    check_dir_output(path, force, kind)
    old_names = _check_replaceable_dir(path, kind)
    old = temp_path(path)
    with _signals_deferred():  # no interrupt may leave the earlier export under a temporary name
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        _fsync_dir(path.parent)
        for name in old_names:
            (old / name).unlink(missing_ok=True)
        try:
            os.rmdir(old)
        except OSError:
            pass  # something new appeared in it: keep it
