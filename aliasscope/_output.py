"""Output folders a user can trust: written whole or not at all, by one run at a time, and saying
what produced them.

A run writes into a fresh hidden folder beside ``--out`` (``.<name>.partial-<pid>``) and only moves
it into place once it has finished, together with a ``manifest.json`` (command line, provenance,
versions, start and end time, every file with its size). An earlier aliasscope output at ``--out``
(recognised by its manifest) is replaced whole; any other non-empty folder is refused. A lock file
beside the folder (``.<name>.lock``) keeps a second run from writing into the same ``--out``.

>>> with output_folder("aliasscope-out", command=["aliasscope", "diagnose"]) as out:  # doctest: +SKIP
...     out.provenance.update(model="resnet18", weights="random init")
...     out.write_csv("metrics.csv", rows)  # provenance columns appended to every row
...     out.write_json("summary.json", summary)  # a "provenance" object added
...     plot(out / "figures" / "transforms")  # any other file: a path inside the partial folder
... # committed here; on an exception or Ctrl-C the partial folder is removed instead
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .results import rows_to_csv, to_json_text

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT",
    "MANIFEST",
    "Interrupted",
    "OutputBusyError",
    "OutputError",
    "OutputFolder",
    "OutputLock",
    "interrupted_message",
    "is_output_folder",
    "output_folder",
]

MANIFEST = "manifest.json"
"""Name of the manifest every aliasscope output folder carries (and is recognised by)."""

FORMAT = "aliasscope-output/1"
"""The manifest's ``format`` entry."""


class OutputError(ValueError):
    """``--out`` cannot be written (not an aliasscope folder, a file, or busy); the message says why."""


class OutputBusyError(OutputError):
    """Another run holds the lock of the output folder."""

    def __init__(self, out: str, pid: int | None) -> None:
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"another aliasscope run ({who}) is writing into {out}; wait for it to finish or choose "
            "another --out"
        )


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that says what it left in the output folder (:attr:`message`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def interrupted_message(out: str | os.PathLike[str], state: str = "open") -> str:
    """The one line for a run into ``out`` interrupted while its folder was ``state`` ("open": before
    it was moved into place, "committed": after)."""
    out = _display(out)
    if state == "committed":
        return f"interrupted after the run had finished; {out} holds its complete output"
    if is_output_folder(out):
        return f"interrupted; nothing was written, the earlier output in {out} was left as it was"
    return f"interrupted; nothing was written to {out}"


def is_output_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder an aliasscope run wrote: it has a readable aliasscope manifest, or
    (written before manifests existed) a ``summary.json`` / ``comparison.json`` naming aliasscope's
    version."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _legacy_output(Path(path))
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("aliasscope-output")


def _legacy_output(path: Path) -> bool:
    for name, keys in (("summary.json", ("versions",)), ("comparison.json", ("settings", "versions"))):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in keys:
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, dict) and "aliasscope" in data:
            return True
    return False


def _display(out: str | os.PathLike[str]) -> str:
    text = os.fspath(out)
    return text.rstrip("/\\") or text


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (without signalling it)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - os.kill would terminate the process there
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


class OutputLock:
    """An exclusive, non-blocking lock on the file ``path`` (held by one process at a time).

    With ``fcntl`` (Linux, macOS) the lock is a ``flock`` on the file, released by the operating
    system however the holder ends, so a lock file left by a killed run never blocks. Without it,
    the file is created exclusively and holds the owner's pid; a file whose pid is not running is
    stale and taken over. ``display`` is the folder named in the :class:`OutputBusyError`.
    """

    def __init__(self, path: str | os.PathLike[str], display: str | None = None) -> None:
        self.path = Path(path)
        self.display = display or os.fspath(self.path)
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputBusyError` at once; returns ``self``."""
        if self._held:
            raise RuntimeError(f"{self.path} is already held by this OutputLock")
        if fcntl is not None:
            self._acquire_flock()
        else:
            self._acquire_exclusive()
        self._held = True
        return self

    def _acquire_flock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise OutputBusyError(self.display, self._holder()) from None
            # the previous holder unlinks the file while holding it: if it did so after we opened it,
            # we locked a file nobody else will see; start again on the one at the path
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def _holder(self) -> int | None:
        """The holder's pid (it may not have written it yet: wait a little)."""
        for _ in range(20):
            pid = _read_pid(self.path)
            if pid is not None:
                return pid
            time.sleep(0.01)
        return None

    def _acquire_exclusive(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is None:
                    try:  # a holder that has not written its pid yet, or a broken file
                        young = time.time() - self.path.stat().st_mtime < 5
                    except FileNotFoundError:
                        continue
                    if young:
                        raise OutputBusyError(self.display, None) from None
                elif _pid_alive(pid):
                    raise OutputBusyError(self.display, pid) from None
                with contextlib.suppress(FileNotFoundError):  # stale: its process is gone
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
            return
        raise OutputBusyError(self.display, _read_pid(self.path))

    def release(self) -> None:
        """Give the lock back and remove the lock file (a no-op when not held)."""
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still holding it: see _acquire_flock
            os.close(self._fd)
            self._fd = None
        elif _read_pid(self.path) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list[int]]:
    """Hold back Ctrl-C while the folder is moved or removed (the yielded list records any that came)."""
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield received  # signal handlers can only be set from the main thread (and Python's own)
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class OutputFolder:
    """The output folder ``out`` of one run, written atomically (use as a context manager, or through
    :func:`output_folder`).

    Entering takes the lock, checks ``out`` (absent, empty, or an earlier aliasscope output; anything
    else raises :class:`OutputError`), removes what killed runs left beside it and creates the partial
    folder. Write into it with :meth:`write_csv`, :meth:`write_json`, :meth:`write_text`, or any path
    ``self / "relative/path"``. Leaving without an exception commits (:meth:`commit`, also callable
    inside the block, e.g. to print :meth:`describe` afterwards); an exception removes the partial folder
    and leaves ``out`` as it was; a KeyboardInterrupt is re-raised as :class:`Interrupted` whose message
    says so. The lock is released either way.

    Attributes
    ----------
    provenance : dict
        Flat description of the run (model, weights, images, ...), set by the caller before writing:
        appended as constant columns to every CSV, the ``"provenance"`` object of every JSON (with
        :attr:`versions` and the command line) and the top-level entries of the manifest.
    versions : dict
        Package versions recorded in the JSON provenance and the manifest.
    files : list of dict
        After the commit, ``{"path": relative posix path, "bytes": size}`` of every file this run wrote
        (sorted, manifest.json excluded); the manifest's ``files``.
    """

    def __init__(self, out: str | os.PathLike[str], *, command: Sequence[str] | None = None) -> None:
        self.display = _display(out)
        self.target = Path(os.path.abspath(out))
        if self.target.is_symlink():
            self.target = self.target.resolve()
        self.name = self.target.name
        self.parent = self.target.parent
        self.command = list(command) if command is not None else ["aliasscope", *sys.argv[1:]]
        self.provenance: dict[str, Any] = {}
        self.versions: dict[str, str] = {}
        self.files: list[dict[str, Any]] = []
        self.manifest: dict[str, Any] = {}
        self.path = self.parent / f".{self.name}.partial-{os.getpid()}"
        self.lock = OutputLock(self.parent / f".{self.name}.lock", self.display)
        self.state = "new"  # -> open -> committed | rolled back
        self.replaces = False  # an earlier aliasscope output is at the target
        self._started = ""
        self._t0 = 0.0

    # -- entering -------------------------------------------------------------------------------------

    def __enter__(self) -> OutputFolder:
        if not self.name:
            raise OutputError(
                f"--out {self.display} is not a folder aliasscope can replace; choose another --out"
            )
        self.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._tidy()
            self.replaces = self._check_target()
            self._started, self._t0 = _now(), time.time()
            self.path.mkdir()
            self.state = "open"
        except BaseException:  # also a Ctrl-C that comes before the with block holds the folder
            shutil.rmtree(self.path, ignore_errors=True)  # _tidy removed any earlier one: this one is ours
            self.lock.release()
            raise
        return self

    def _leftovers(self) -> list[Path]:
        prefixes = (f".{self.name}.partial-", f".{self.name}.old-")
        return sorted(p for p in self.parent.iterdir() if p.name.startswith(prefixes))

    def _tidy(self) -> None:
        """Remove what killed runs left beside the target (safe: we hold the lock). An earlier output
        moved aside by a run killed in the middle of its commit is put back first."""
        leftovers = self._leftovers()
        if not self.target.exists():
            for old in (p for p in leftovers if ".old-" in p.name):
                if is_output_folder(old):
                    os.replace(old, self.target)
                    break
        for p in self._leftovers():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _check_target(self) -> bool:
        """Whether the target holds an earlier aliasscope output; raises if it may not be replaced."""
        if not self.target.exists():
            return False
        if not self.target.is_dir():
            raise OutputError(
                f"--out {self.display} is a file, not a folder; choose another --out or remove it"
            )
        if is_output_folder(self.target):
            return True
        if any(self.target.iterdir()):
            raise OutputError(
                f"--out {self.display} exists and is not an aliasscope output folder (it has files but no "
                f"{MANIFEST}); choose another --out or remove it"
            )
        return False

    # -- writing --------------------------------------------------------------------------------------

    def __truediv__(self, relative: str | os.PathLike[str]) -> Path:
        """A path inside the partial folder (its parent folders created)."""
        if self.state != "open":
            raise RuntimeError(f"output folder {self.display} is {self.state}, not open for writing")
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, relative: str, text: str) -> str:
        """Write ``text`` to ``relative``; returns it."""
        (self / relative).write_text(text, encoding="utf-8")
        return text

    def write_csv(self, relative: str, rows: Sequence[Mapping[str, Any]]) -> str:
        """``rows`` as CSV with the :attr:`provenance` columns after their own; returns the text."""
        return rows_to_csv(rows, self / relative, constant_columns=self.provenance)

    def json_provenance(self) -> dict[str, Any]:
        """The ``"provenance"`` object of every JSON this run writes."""
        return {**self.provenance, "versions": dict(self.versions), "command": self.command_line()}

    def write_json(self, relative: str, data: dict[str, Any]) -> str:
        """Add a ``"provenance"`` entry to ``data`` (in place, after its keys; kept if already there)
        and write it as strict JSON; returns the text."""
        data.setdefault("provenance", self.json_provenance())
        return self.write_text(relative, to_json_text(data))

    def command_line(self) -> str:
        import shlex

        return shlex.join(self.command)

    # -- leaving --------------------------------------------------------------------------------------

    def _walk(self) -> list[dict[str, Any]]:
        files = []
        for root, _dirs, names in os.walk(self.path):
            for name in names:
                path = Path(root) / name
                relative = path.relative_to(self.path).as_posix()
                if relative != MANIFEST:
                    files.append({"path": relative, "bytes": path.stat().st_size})
        return sorted(files, key=lambda f: f["path"])

    def written(self) -> list[str]:
        """Relative paths of the files written so far (while open) or by this run (after the commit)."""
        if self.state == "committed":
            return [f["path"] for f in self.files]
        return [f["path"] for f in self._walk()] if self.path.is_dir() else []

    def commit(self) -> None:
        """Write the manifest and move the finished folder into place (replacing an earlier output
        whole), then release the lock. A Ctrl-C during the move is held back and raised afterwards."""
        if self.state == "committed":
            return
        if self.state != "open":
            raise RuntimeError(f"output folder {self.display} is {self.state}, cannot commit")
        with _sigint_deferred() as received:
            try:
                self._commit()
            except BaseException:
                self._rollback()
                raise
            self.state = "committed"
            self.lock.release()
        if received:
            raise KeyboardInterrupt

    def _commit(self) -> None:
        self.files = self._walk()
        finished = time.time()
        self.manifest = {
            "format": FORMAT,
            "status": "complete",
            "command": self.command_line(),
            "argv": self.command,
            **self.provenance,
            "versions": dict(self.versions),
            "started": self._started,
            "finished": _now(),
            "seconds": round(finished - self._t0, 2),
            "files": self.files,
        }
        (self.path / MANIFEST).write_text(to_json_text(self.manifest), encoding="utf-8")
        replaces = self._check_target()  # again: it may have changed while the run was going
        if not self.target.exists():
            os.replace(self.path, self.target)
        elif not replaces:  # an empty folder
            self.target.rmdir()
            os.replace(self.path, self.target)
        elif _exchange(self.path, self.target):
            shutil.rmtree(self.path, ignore_errors=True)  # now holds the earlier output
        else:
            old = self.parent / f".{self.name}.old-{os.getpid()}"
            os.replace(self.target, old)
            try:
                os.replace(self.path, self.target)
            except BaseException:
                os.replace(old, self.target)
                raise
            shutil.rmtree(old, ignore_errors=True)

    def _rollback(self) -> None:
        with _sigint_deferred():
            shutil.rmtree(self.path, ignore_errors=True)
            self.state = "rolled back"
            self.lock.release()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is None:
            try:
                self.commit()
            except KeyboardInterrupt:
                raise Interrupted(interrupted_message(self.display, self.state)) from None
            return False
        if self.state == "open":
            self._rollback()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted(interrupted_message(self.display, self.state)) from None
        return False

    # -- reading --------------------------------------------------------------------------------------

    def describe(self) -> str:
        """What this run wrote, for the final line: ``"metrics.csv, summary.json, manifest.json and
        figures/ (7 files)"`` (top-level files, then folders; the count includes the manifest)."""
        paths = [*self.written(), MANIFEST] if self.state == "committed" else self.written()
        top = [p for p in paths if "/" not in p]
        folders = sorted({p.split("/", 1)[0] + "/" for p in paths if "/" in p})
        names = top + folders
        if not names:
            text = "nothing"
        elif len(names) == 1:
            text = names[0]
        else:
            text = ", ".join(names[:-1]) + " and " + names[-1]
        return f"{text} ({len(paths)} file{'s' if len(paths) != 1 else ''})"


def output_folder(out: str | os.PathLike[str], *, command: Sequence[str] | None = None) -> OutputFolder:
    """The :class:`OutputFolder` of ``out``, to use in a ``with`` statement."""
    return OutputFolder(out, command=command)
