"""File I/O used by every reader and writer: the iopath path manager, atomic writes, output
checks, stale temporaries, and one-line errors for write faults.

**Paths.** Every file the framework reads or writes by path goes through :data:`PATH_MANAGER`,
an iopath ``PathManager``. Plain paths use iopath's ``NativePathHandler``; a backend for a URI
prefix (``s3://``, ``manifold://``, a test's ``tmpfs://``) is a subclass of :class:`PathHandler`
added with :func:`register_handler`.
Code that needs a real local file (``np.memmap`` reads of stores, faiss index files, paths passed
to subprocesses) calls :func:`get_local_path`; see "Storage backends (iopath)" in docs/RETRIEVAL.md.

**Atomic writes.** :func:`atomic_write` yields a file open on ``.<name>.tmp<pid>`` in the target's
folder; when the block ends it is flushed, fsynced and renamed over the target with
``os.replace`` (atomic on POSIX), so readers see the old file or the new one, never half of one.
On any error, KeyboardInterrupt included, the temporary is removed and the old file is left
intact. :func:`atomic_folder` does the same for a folder (feature stores): it is filled under a
temporary name and swapped into place (one ``renameat2(RENAME_EXCHANGE)`` on Linux). Through a
non-native handler the temporary is written with the manager and moved with the manager's
``mv`` (an existing target is removed first when ``mv`` will not overwrite): atomicity then
depends on the handler.

**Write faults.** An ``OSError`` while writing (also one wrapped by a library, as torch wraps the
``ENOSPC`` of a full disk in a RuntimeError) becomes :class:`~metric.utils.errors.OutputError`
with one line naming the path and the cause: ``no space left on device``, ``read-only file
system``, ``permission denied``, ... Tools print that line and exit with status 2.

**Stale temporaries.** A process killed while writing leaves its ``.<name>.tmp<pid>``; the next
writer in that folder removes it with :func:`clean_stale_temps` (the pid is not running, or the
entry is older than the process that now has that pid).
"""

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid

import simplejson
from iopath.common.file_io import NativePathHandler, PathHandler, PathManager  # noqa: F401 (PathHandler: for backends)

from metric.utils.errors import OutputError

logger = logging.getLogger(__name__)

PATH_MANAGER = PathManager()
PATH_MANAGER.register_handler(NativePathHandler(), allow_override=True)
PATH_MANAGER.set_logging(False)  # no iopath telemetry events on every call

# errno -> the cause as printed in the one-line error.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
    errno.ENAMETOOLONG: "file name too long",
}

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
_OLD_TAG = ".old-"


# ----------------------------------------------------------------------------- path manager


def register_handler(handler, allow_override=False):
    """Add an iopath ``PathHandler`` (a storage backend for the prefixes it declares)."""
    PATH_MANAGER.register_handler(handler, allow_override=allow_override)


def _handler(path):
    return PATH_MANAGER._PathManager__get_path_handler(os.fspath(path))  # iopath's own dispatch


def is_local(path):
    """True when ``path`` is handled by the native (local file system) handler."""
    return _handler(path) is PATH_MANAGER._native_path_handler


def abspath(path):
    """``os.path.abspath`` for local paths; a URI of another backend is returned unchanged."""
    path = os.fspath(path)
    return os.path.abspath(path) if is_local(path) else path


def open_path(path, mode="r", **kwargs):
    """Open ``path`` through the path manager (text modes default to UTF-8)."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return PATH_MANAGER.open(os.fspath(path), mode, **kwargs)


@contextlib.contextmanager
def open_text(path, error=ValueError, what="the file"):
    """Open a text file through the path manager for reading line by line, as ``open_path(path)``
    but decoding each line as UTF-8 on its own, so that bytes that are not UTF-8 raise ``error``
    with one line naming ``path:line`` and the byte (not a decoder traceback). Lines keep their
    ends (only ``\\n`` ends a line, as with ``newline=""``); a leading byte-order mark is dropped."""
    with open_path(path, "rb") as f:
        yield _utf8_lines(f, path, error, what)


def _utf8_lines(f, path, error, what):
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            column = len(raw[: err.start].decode("utf-8", "replace")) + 1
            raise error(
                f"{path}:{lineno}: {what} is not UTF-8 text ({err.reason}: byte 0x{raw[err.start]:02x} at "
                f"column {column}); save it as UTF-8"
            ) from None
        yield line[1:] if lineno == 1 and line.startswith("\ufeff") else line


def exists(path):
    return PATH_MANAGER.exists(os.fspath(path))


def isfile(path):
    return PATH_MANAGER.isfile(os.fspath(path))


def isdir(path):
    return PATH_MANAGER.isdir(os.fspath(path))


def ls(path):
    """Names (not paths) of the entries of folder ``path``."""
    return PATH_MANAGER.ls(os.fspath(path))


def mkdirs(path, what="output"):
    """Create folder ``path`` and its parents; an OS error, or a file of that name, becomes an
    :class:`OutputError`."""
    path = os.fspath(path)
    try:
        PATH_MANAGER.mkdirs(path)
    except OSError as err:
        raise output_error(err, path, f"{what} folder", verb="create") from None
    if is_local(path) and not os.path.isdir(path):  # iopath ignores EEXIST: a file of that name is "created"
        raise OutputError(f"cannot create {what} folder {path}: it exists and is not a folder; choose another path")
    return path


def rm(path):
    PATH_MANAGER.rm(os.fspath(path))


def rmtree(path):
    """Remove folder ``path`` with everything in it (best effort; errors are ignored)."""
    path = os.fspath(path)
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        for name in ls(path):
            child = os.path.join(path, name)
            rmtree(child) if isdir(child) else rm(child)
        rm(path)
    except OSError:
        pass


def get_local_path(path, **kwargs):
    """A local file name for ``path`` (the path itself for local files; a cached copy otherwise)."""
    return PATH_MANAGER.get_local_path(os.fspath(path), **kwargs)


# ----------------------------------------------------------------------------- errors


def find_os_error(exc):
    """The ``OSError`` that is ``exc`` or that caused it (``__cause__``/``__context__``), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(err):
    """The cause of an ``OSError`` in words (``no space left on device``, ...)."""
    return _CAUSES.get(err.errno) or (err.strerror or str(err)).lower()


def output_error(err, path, what="output", verb="write"):
    """An :class:`OutputError` ``cannot <verb> <what> <path>: <cause>`` for OS error ``err``."""
    what = f"{what} " if what else ""
    return OutputError(f"cannot {verb} {what}{path}: {describe_os_error(err)}")


def _as_output_error(exc, path, related, what, inside=()):
    """The OutputError for ``exc`` if it is (or wraps) an OS error of this write, else None.

    Errors with a known cause (full disk, read-only, permission, ...) always map; any other OS
    error only when it names none or one of the ``related`` paths (or a path in one of the
    ``inside`` folders), so that a failure to *read* some input inside the block keeps its own
    message."""
    if isinstance(exc, OutputError):
        return None
    err = find_os_error(exc)
    if err is None:
        return None
    name = os.fspath(err.filename) if isinstance(err.filename, (str, bytes, os.PathLike)) else None
    if err.errno in _CAUSES or name is None or name in related or any(name.startswith(d + os.sep) for d in inside):
        return output_error(err, path, what)
    return None


@contextlib.contextmanager
def write_errors(path, what="output"):
    """Map OS errors raised in the block (writing ``path``) to a one-line :class:`OutputError`."""
    path = os.fspath(path)
    try:
        yield
    except Exception as exc:
        mapped = _as_output_error(exc, path, (path, os.path.dirname(path)), what)
        if mapped is None:
            raise
        raise mapped from None


# ----------------------------------------------------------------------------- output checks


def _read_only_fs(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_path(path, what="output", folder=False, create=False):
    """Check that ``path`` can be written (before any long work) and return it (absolute if local).

    The parent folder must exist (with ``create`` it is created, or the error says why it cannot
    be) and be writable; ``path`` must not be an existing folder when a file is written
    (``folder=False``) nor an existing file when a folder is written (``folder=True``).
    Raises :class:`OutputError`."""
    path = abspath(path)
    local = is_local(path)
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if folder and isfile(path):
        raise OutputError(f"{what} {path} exists and is a file; give a folder path")
    if not folder and isdir(path):
        raise OutputError(f"{what} {path} is a folder; give a file path")
    if not isdir(parent):
        where = f"parent folder {parent} of {what} {path}" if folder else f"{what} folder {parent}"
        if local and os.path.lexists(parent):
            raise OutputError(f"{where} is not a folder; choose another {what} path")
        if not create:
            raise OutputError(f"{where} does not exist; create it or choose another {what} path")
        mkdirs(parent, what)
    if local and not os.access(parent, os.W_OK | os.X_OK):
        cause = "read-only file system" if _read_only_fs(parent) else "permission denied"
        raise OutputError(f"cannot write {what} {path}: {cause} (folder {parent})")
    return path


def _same_file_key(path):
    """The name that two spellings of one local path share (relative, ``..``, symlinks resolved)."""
    path = os.fspath(path)
    return os.path.realpath(path) if is_local(path) else path.rstrip("/")


def _inside(path, folder):
    return path.startswith(folder.rstrip("/") + "/")


def check_distinct_paths(outputs, inputs=(), stores=()):
    """Refuse (:class:`OutputError`, before any work) a command whose outputs collide, each pair
    compared by real path (relative paths, ``..`` and symbolic links resolved):

    - two ``outputs`` that are one file (``--output x.csv --scores x.csv``);
    - an output that is one of the ``inputs`` or ``stores`` (it would be overwritten while read);
    - an output inside one of ``stores``: folders the command reads that are replaced as a whole
      (feature stores: a file written into one would break it, or be lost with it);
    - an input or store inside an output (an output folder is replaced as a whole).

    Each of ``outputs``, ``inputs`` and ``stores`` is a sequence of ``(name, path)`` where
    ``name`` is how the user gave it (``--scores``, ``INFER.OUTPUT``); an empty or ``None`` path
    is skipped."""

    def label(name, path):
        return name if name == path else f"{name} {path}"

    outs = [(name, path, _same_file_key(path)) for name, path in outputs if path]
    reads = [(name, path, _same_file_key(path), False) for name, path in inputs if path]
    reads += [(name, path, _same_file_key(path), True) for name, path in stores if path]
    for i, (name, path, key) in enumerate(outs):
        for other, _, other_key in outs[:i]:
            if key == other_key:
                raise OutputError(f"{other} and {name} are the same file {key}; give each output its own path")
        for in_name, in_path, in_key, store in reads:
            if key == in_key:
                raise OutputError(
                    f"{label(name, path)} is also the input {in_name}: it would be overwritten; choose another {name}"
                )
            if store and _inside(key, in_key):
                raise OutputError(
                    f"{label(name, path)} is inside the input {label(in_name, in_path)}, a feature "
                    "store (replaced as a whole); write it outside that folder"
                )
            if _inside(in_key, key):
                raise OutputError(
                    f"the input {label(in_name, in_path)} is inside the output {label(name, path)}, "
                    f"which is replaced as a whole; choose another {name}"
                )


# ----------------------------------------------------------------------------- temporaries


def temp_path(path):
    """The temporary sibling ``.<name>.tmp<pid>`` a write of ``path`` goes through."""
    path = os.fspath(path).rstrip("/")
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.tmp{os.getpid()}")


def _clock_ticks():
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def process_start_time(pid):
    """Start time (seconds since the epoch) of process ``pid`` from /proc, or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / _clock_ticks()  # field 22 of stat: starttime in clock ticks


def pid_running(pid):
    """True when a process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _is_stale(path, pid, local):
    if not pid_running(pid):
        return True
    if not local:
        return False
    start = process_start_time(pid)
    try:
        mtime = os.lstat(path).st_mtime
    except OSError:
        return False
    return start is not None and mtime < start - 1.0  # written before that pid's process began


def clean_stale_temps(folder, name=None):
    """Remove ``.<name>.tmp<pid>`` files and folders in ``folder`` left by processes that no
    longer run (or older than the process that now has that pid). With ``name`` only the
    temporaries of that target are considered (writers of other targets in a shared folder,
    possibly on other machines, are left alone). Logs one line; returns the removed paths."""
    folder = os.fspath(folder)
    local = is_local(folder)
    try:
        if not isdir(folder):
            return []
        names = ls(folder)
    except OSError:
        return []
    removed = []
    for entry in sorted(names):
        m = _TEMP_RE.match(entry)
        if not m or (name is not None and m.group("name") != name):
            continue
        path = os.path.join(folder, entry)
        if not _is_stale(path, int(m.group("pid")), local):
            continue
        try:
            if local and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif isdir(path):
                rmtree(path)
            else:
                rm(path)
        except OSError as err:
            logger.warning("cannot remove stale temporary %s: %s", path, describe_os_error(err))
            continue
        removed.append(path)
    if removed:
        logger.info(
            "removed %d stale temporary file(s) of interrupted writes in %s: %s",
            len(removed),
            folder,
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed


def _remove_quietly(path, local):
    try:
        if local:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        elif exists(path):
            rmtree(path) if isdir(path) else rm(path)
    except (OSError, NotImplementedError):
        pass


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manager_move(src, dst):
    """Move through the path manager, replacing ``dst`` (not atomic unless the handler makes it so)."""
    try:
        if isdir(dst):  # a folder is never moved over another one: the old one goes first
            rmtree(dst)
        try:
            if PATH_MANAGER.mv(src, dst):
                return
        except OSError:
            if not exists(dst):
                raise
        if exists(dst):  # iopath's native mv refuses to overwrite; others may raise
            rm(dst)
            if PATH_MANAGER.mv(src, dst):
                return
    except NotImplementedError:
        if not isdir(src) and PATH_MANAGER.copy(src, dst, overwrite=True):
            rm(src)
            return
    raise OutputError(f"cannot move {src} to {dst} (storage backend {type(_handler(dst)).__name__})")


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None, newline=None, what="output"):
    """Write ``path`` atomically: ``with atomic_write(p, "w") as f: f.write(...)``.

    The block writes to ``.<name>.tmp<pid>`` in the same folder; at its end the file is
    flushed, fsynced and renamed over ``path``. On any error (KeyboardInterrupt included) the
    temporary is removed, ``path`` keeps its old content, and OS errors of the write become one
    :class:`OutputError` naming ``path`` and the cause. ``what`` names the file in that error."""
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = abspath(path)
    local = is_local(path)
    tmp = temp_path(path)
    kwargs = {} if "b" in mode else {"encoding": encoding or "utf-8", "newline": newline}
    f = None
    try:
        f = open(tmp, mode, **kwargs) if local else PATH_MANAGER.open(tmp, mode, **kwargs)
        yield f
        f.flush()
        if local:
            os.fsync(f.fileno())
        f.close()
        if local:
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        else:
            _manager_move(tmp, path)
    except BaseException as exc:
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()
        _remove_quietly(tmp, local)
        mapped = (
            _as_output_error(exc, path, (path, tmp, os.path.dirname(path)), what)
            if isinstance(exc, Exception)
            else None
        )
        if mapped is None:
            raise
        raise mapped from None


@contextlib.contextmanager
def atomic_local_path(path, what="output"):
    """Like :func:`atomic_write`, for writers that need a local file *name* (faiss, onnx, zipfile,
    a subprocess): yields a local temporary path for the block to create; at the end it is
    fsynced and renamed over ``path`` (for a non-native backend: copied there through the path
    manager). On any error the temporary is removed and OS errors become an OutputError."""
    path = abspath(path)
    local = is_local(path)
    if local:
        tmp = temp_path(path)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{os.getpid()}")
        os.close(fd)
    remote_tmp = None
    try:
        yield tmp
        if local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        else:
            remote_tmp = temp_path(path)
            PATH_MANAGER.copy_from_local(tmp, remote_tmp, overwrite=True)
            _manager_move(remote_tmp, path)
            remote_tmp = None
    except BaseException as exc:
        if remote_tmp is not None:
            _remove_quietly(remote_tmp, False)
        mapped = (
            _as_output_error(exc, path, (path, tmp, os.path.dirname(path)), what)
            if isinstance(exc, Exception)
            else None
        )
        if mapped is None:
            raise
        raise mapped from None
    finally:
        _remove_quietly(tmp, True)


def write_bytes_atomic(path, data, what="output"):
    with atomic_write(path, "wb", what=what) as f:
        f.write(data)
    return abspath(path)


def write_text_atomic(path, text, what="output", newline=None):
    with atomic_write(path, "w", newline=newline, what=what) as f:
        f.write(text)
    return abspath(path)


def write_json_atomic(path, obj, what="output", **dump_kwargs):
    """Write ``obj`` as JSON (simplejson; NaN/inf are rejected unless ``ignore_nan=True``)."""
    dump_kwargs.setdefault("indent", 2)
    text = simplejson.dumps(obj, **dump_kwargs) + "\n"  # serialize first: a bad object writes nothing
    return write_text_atomic(path, text, what=what)


def read_json(path):
    """A JSON document from ``path`` (simplejson)."""
    with open_path(path, "r") as f:
        return simplejson.load(f)


def file_sha256(path):
    """The SHA-256 hex digest of the file at ``path``, read through the path manager in 4 MiB
    blocks: what a saved index, graph or export records of the file it describes."""
    h = hashlib.sha256()
    with open_path(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- atomic folders


def _rename_exchange(a, b):
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False when unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _swap_folder_into_place(tmp, path):
    parent, name = os.path.split(path)
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _rename_exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
    else:
        aside = os.path.join(parent, f".{name}{_OLD_TAG}{uuid.uuid4().hex[:8]}")
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(aside, path)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(parent)


@contextlib.contextmanager
def atomic_folder(path, what="output folder"):
    """Fill a folder atomically: ``with atomic_folder(p) as tmp:`` write files into ``tmp``.

    ``tmp`` is ``.<name>.tmp<pid>`` next to ``path``; at the end of the block it replaces
    ``path`` (an existing folder is swapped out and removed, so a kill at any moment leaves the
    old folder or the new one). On any error the temporary folder is removed and OS errors
    become one :class:`OutputError`. Callers check first that ``path`` may be replaced."""
    path = abspath(path).rstrip("/") or "/"
    local = is_local(path)
    tmp = temp_path(path)
    _remove_quietly(tmp, local)  # our own leftover (same pid): never a live write
    created = False
    try:
        if local:
            os.mkdir(tmp)
        else:
            PATH_MANAGER.mkdirs(tmp)
        created = True
        yield tmp
        if local:
            _fsync_dir(tmp)
            _swap_folder_into_place(tmp, path)
        else:
            _manager_move(tmp, path)
    except BaseException as exc:
        if created:
            _remove_quietly(tmp, local)
        mapped = (
            _as_output_error(exc, path, (path, tmp, os.path.dirname(path)), what, inside=(tmp,))
            if isinstance(exc, Exception)
            else None
        )
        if mapped is None:
            raise
        raise mapped from None


def write_through(path, data):
    """Write ``data`` (bytes) to ``path`` — a file inside an :func:`atomic_folder` — and fsync it."""
    with open_path(path, "wb") as f:
        f.write(data)
        f.flush()
        if is_local(path):
            os.fsync(f.fileno())
