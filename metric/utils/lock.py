"""One writer per output: an exclusive OS file lock held by the run that writes it.

A training run locks ``OUT_DIR/.lock``; a feature store is locked by ``<store>.lock`` next to it
(a store folder is replaced as a whole by an atomic rename, so its lock cannot live inside it).
The lock is ``fcntl.flock`` on that file: it belongs to the open file, so it is released when
the process ends in any way, ``kill -9`` included, and a later run never finds a stale lock.
The file holds the holder's pid and host, for the message a second run gets::

    OUT_DIR output/x is in use by another run (pid 1234); wait for it or choose another OUT_DIR

A lock is reentrant within a process (taking a path this process holds counts up). The file is
opened close-on-exec, so processes spawned by the holder do not inherit the lock; the holder
removes the file when it lets go. Only local paths are locked: on another storage backend
(iopath) and on file systems without ``flock`` the run goes on unlocked (logged at debug level).
Who takes which lock under several processes is the caller's decision (see
:func:`metric.engine.trainer.train_model`).
"""

import contextlib
import errno
import fcntl
import logging
import os
import socket
import threading

import metric.utils.io as io
from metric.utils.errors import OutputBusyError, OutputError

logger = logging.getLogger(__name__)

_held = {}  # real path of the lock file -> [fd, count]
_guard = threading.Lock()


def _holder(fd):
    """``pid N`` (``pid N on HOST`` when another machine holds it) from the lock file's text."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 256).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if not text or not text[0].isdigit():
        return "pid unknown"
    if len(text) > 1 and text[1] != socket.gethostname():
        return f"pid {text[0]} on {text[1]}"
    return f"pid {text[0]}"


def _lock_file(path, label, fix):
    """Open ``path`` and flock it without waiting; the fd, or None where locks are unsupported."""
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(fd)
                os.close(fd)
                raise OutputBusyError(f"{label} is in use by another run ({holder}); wait for it or {fix}") from None
            os.close(fd)
            logger.debug("cannot lock %s (%s): going on without a lock", path, err)
            return None
        # The previous holder removes the file as it lets go: if that happened between our open
        # and our flock, we hold a file no one else will open. Take the one at the path instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise OSError(errno.EBUSY, f"cannot take the lock file {path}: it keeps being replaced")


def acquire(lock_path, label, fix):
    """Take the lock ``lock_path`` (its folder must exist); raise :class:`OutputBusyError`
    ``"<label> is in use by another run (pid N); wait for it or <fix>"`` if another process holds
    it. Returns a key for :func:`release` (None when the path cannot be locked)."""
    if not io.is_local(lock_path):
        logger.debug("%s is not on a local file system: not locked", lock_path)
        return None
    key = os.path.realpath(lock_path)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return key
        with io.write_errors(key, "lock file"):  # key: the name in the OS error
            fd = _lock_file(key, label, fix)
        if fd is None:
            return None
        _held[key] = [fd, 1]
    return key


def release(key):
    """Let go of a lock taken by :func:`acquire` (the file is removed by its last holder)."""
    if key is None:
        return
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
    try:
        os.unlink(key)  # while still holding it (see _lock_file)
    except OSError:
        pass
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children (data-loader workers) sharing the fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(lock_path, label, fix):
    """``with hold(path, label, fix):`` the lock, held for the block (see :func:`acquire`)."""
    key = acquire(lock_path, label, fix)
    try:
        yield key
    finally:
        release(key)


def folder_lock(folder, label, fix):
    """The lock of a folder the run owns: ``FOLDER/.lock`` (the folder must exist; an existing
    file of that name is an :class:`OutputError` ``"<label> exists and is not a folder; <fix>"``)."""
    folder = os.fspath(folder)
    if io.is_local(folder) and os.path.lexists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{label} exists and is not a folder; {fix}")
    return hold(os.path.join(folder, ".lock"), label, fix)


def sibling_lock(path, label, fix):
    """The lock of an output replaced as a whole (a store folder, a file): ``PATH.lock`` next to
    it (its parent folder must exist)."""
    return hold(io.abspath(os.fspath(path)).rstrip("/") + ".lock", label, fix)


def holds(lock_path):
    """Whether this process holds the lock ``lock_path``."""
    with _guard:
        return os.path.realpath(lock_path) in _held
