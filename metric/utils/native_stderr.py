"""What C libraries print to file descriptor 2 while a call runs, caught instead of shown.

libjpeg ("Corrupt JPEG data: 3034 extraneous bytes before marker 0xd9", "Premature end of JPEG
file") and libpng ("libpng error: IDAT: CRC error") write their messages straight to the
process's stderr, below Python, where neither ``sys.stderr`` nor OpenCV's log level reaches.
:func:`captured` points descriptor 2 at a private in-memory file for the duration of a call and
hands back what was written, so the caller can log it with the name of the image it is about.

The redirection is process-wide, so it is held under a lock (one call at a time per process;
OpenCV is used with one thread here) and kept short: wrap a single library call, nothing that
logs. Something another thread writes to stderr meanwhile ends up in the captured text (it is
then logged, not lost). Each process (DataLoader workers included) gets its own file.
"""

import contextlib
import os
import sys
import tempfile
import threading

_LOCK = threading.Lock()
_SINK = {}  # pid -> (fd of the in-memory file, object that keeps it open)


def _new_lock():
    global _LOCK
    _LOCK = threading.Lock()  # a child forked while another thread held it must not wait forever


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)


class Captured:
    """The text written to descriptor 2 inside :func:`captured` (``""`` when nothing was)."""

    text = ""


def _sink_fd():
    pid = os.getpid()
    entry = _SINK.get(pid)
    if entry is None:
        for fd, keeper in _SINK.values():  # the parent's file, inherited by a forked process
            try:
                keeper.close() if keeper is not None else os.close(fd)
            except OSError:
                pass
        _SINK.clear()
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("pymetric-stderr", getattr(os, "MFD_CLOEXEC", 0))
            entry = (fd, None)
        else:
            f = tempfile.TemporaryFile()
            entry = (f.fileno(), f)
        _SINK[pid] = entry
    return entry[0]


@contextlib.contextmanager
def captured():
    """Catch what is written to file descriptor 2 inside the block; yields a :class:`Captured`
    whose ``text`` (stripped, decoded leniently) is set when the block ends. Where descriptor 2
    cannot be redirected (closed, no such file), the block runs as is."""
    result = Captured()
    with _LOCK:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        try:
            sink = _sink_fd()
            saved = os.dup(2)
        except OSError:
            yield result
            return
        try:
            os.dup2(sink, 2)
        except OSError:
            os.close(saved)
            yield result
            return
        try:
            yield result
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(sink, 0, os.SEEK_END)
            if size:
                data = os.pread(sink, size, 0)
                os.ftruncate(sink, 0)
                result.text = data.decode("utf-8", "replace").strip()
            os.lseek(sink, 0, os.SEEK_SET)
