"""The run folder: made and locked before anything expensive starts, never silently reused.

``claim_run_dir`` creates the folder, takes an exclusive ``fcntl.flock`` on ``<run>/.lock``
(held until ``release``; the kernel drops it if the process dies, so a killed run never
leaves a stale lock), and refuses a folder that already holds anything unless the caller
resumes it (``--resume``) or asked to replace it (``--overwrite``). Replacing removes only
a run's own files (config, results, checkpoints), never anything else a user keeps there.

Example::

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> lock = claim_run_dir(d, resume=False, overwrite=False)
    >>> (d / ".lock").is_file()
    True
    >>> lock.release()
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from hierfed.errors import CheckpointError, ConfigError, HierfedError

LOCK_NAME = ".lock"
# what a run writes into its folder; --overwrite removes these and nothing else
RUN_FILES = frozenset(
    {
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "ledger.csv",
        "final_state.safetensors",
        "final_state.json",
        "summary.json",
        "personalized.json",
        "continual.json",  # a continual run's accuracy matrices (hierfed/continual)
        "continual.png",  # its plot, written by `python -m hierfed report`
        "deployment.json",  # a deployed run's status (hierfed.deploy)
    }
)


class RunDirBusy(HierfedError):
    """Another live process holds the run folder's lock."""


class RunDirLock:
    """An exclusive lock on one run folder; ``release`` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int, *, created: bool = False) -> None:
        self.path, self._fd, self.created = path, fd, created

    def release(self) -> None:
        """Unlock; a folder this lock created and nothing was written into is removed again
        (a run that failed before its first file leaves no empty folder behind)."""
        if self._fd < 0:
            return
        try:
            if self.created and os.listdir(self.path) == [LOCK_NAME]:
                os.unlink(self.path / LOCK_NAME)
                os.rmdir(self.path)
        except OSError:
            pass  # someone wrote into it meanwhile: keep it
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _make(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError("--out", str(path), "exists and is not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "--out",
            str(path),
            f"cannot create the run folder ({exc.strerror}); choose another --out",
        ) from None


def _lock(path: Path) -> RunDirLock:
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            "--out", str(path), f"cannot write in the run folder ({exc.strerror})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirBusy(
                f"run folder '{path}' is in use by another run (pid {holder}); wait for it to "
                "finish or choose another --out"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunDirLock(path, fd)


def _clear(path: Path, entries: list[Path]) -> None:
    foreign = sorted(p.name for p in entries if p.name not in RUN_FILES)
    if foreign:
        raise ConfigError(
            "--overwrite",
            str(path),
            f"the folder holds '{foreign[0]}', which a run did not write; --overwrite replaces "
            "only a run's own files, so choose another --out",
        )
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def claim_run_dir(path: str | Path, *, resume: bool, overwrite: bool) -> RunDirLock:
    """Create and lock ``path`` for one run. Raises ConfigError for a folder that cannot be
    made or that already holds something (unless ``resume`` or ``overwrite``), RunDirBusy
    while another process holds it. ``overwrite`` removes the previous run's files."""
    path = Path(path)
    if resume and overwrite:
        raise ConfigError("--overwrite", True, "cannot be combined with --resume; pick one")
    if resume and not path.is_dir():
        raise CheckpointError(f"'{path}' has no checkpoint to resume from (no such folder)")
    created = not path.exists()
    _make(path)
    lock = _lock(path)
    lock.created = created
    try:
        entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
        if entries and not resume:
            if not overwrite:
                names = ", ".join(sorted(p.name for p in entries)[:3])
                raise ConfigError(
                    "--out",
                    str(path),
                    f"the folder is not empty ({names}, ...); pass --resume {path} to continue "
                    "that run, --overwrite to replace it, or choose another --out",
                )
            _clear(path, entries)
        from hierfed.resume import forget_logs

        forget_logs(path)
    except BaseException:
        lock.release()
        raise
    return lock


def unique_default(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... for the first that does not exist yet: two
    runs started in the same second with default folders never share one."""
    candidate, i = path, 1
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}-{i}")
    return candidate
