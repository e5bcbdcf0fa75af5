"""Logging setup and JSON-lines statistics.

Rank 0 logs INFO to stdout (warnings and errors to stderr) and to ``OUT_DIR/log.txt``;
other ranks log warnings only. :class:`StatsWriter` appends one JSON object per line to
``OUT_DIR/stats.jsonl`` (rank 0 only, with simplejson); :func:`read_stats` parses it back.
Both files go through the iopath path manager (:mod:`metric.utils.io`), so ``OUT_DIR`` may be
on any registered storage backend.
"""

import logging
import math
import os
import sys

import simplejson

import metric.utils.io as io
from metric.utils.errors import DataError

_FORMAT = "[%(asctime)s %(name)s] %(message)s"

logger = logging.getLogger(__name__)

# Records of this logger (the full config dump) go to log.txt only, not to the console.
FILE_ONLY = "metric.file_only"


def _not_file_only(record):
    return record.name != FILE_ONLY


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of each record (not the
    stream of the moment of setup): progress below WARNING to stdout, warnings and errors to stderr."""

    def __init__(self, errors):
        self.errors = errors
        super().__init__()
        self.addFilter(lambda r: (r.levelno >= logging.WARNING) == errors)

    @property
    def stream(self):
        return sys.stderr if self.errors else sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(out_dir=None, rank=0):
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "pymetric", False):  # ours from an earlier call; leave others' handlers alone
            root.removeHandler(h)
            h.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    fmt = logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank} %(asctime)s %(name)s] %(message)s", "%H:%M:%S")
    for errors in (False, True):
        console = _ConsoleHandler(errors)
        console.setFormatter(fmt)
        console.addFilter(_not_file_only)
        console.pymetric = True
        root.addHandler(console)
    if out_dir and rank == 0:
        io.mkdirs(out_dir)
        log_path = os.path.join(out_dir, "log.txt")
        with io.write_errors(log_path, "log file"):
            fh = logging.FileHandler(log_path) if io.is_local(log_path) else _PathLogHandler(log_path)
        fh.setFormatter(logging.Formatter(_FORMAT))
        fh.pymetric = True
        root.addHandler(fh)


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):
        return _clean(value.item())
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class _PathLogHandler(logging.StreamHandler):
    """A log file on a non-local storage backend, appended to through the path manager."""

    def __init__(self, path):
        super().__init__(io.open_path(path, "a"))

    def close(self):
        try:
            self.flush()
            self.stream.close()
        finally:
            super().close()


class StatsWriter:
    """Appends JSON objects, one per line, to ``OUT_DIR/stats.jsonl`` (no-op unless ``enabled``).

    Each record is in the file once, however often the run was killed and rerun: a resume cuts
    the file back to the checkpoint it resumes from (:meth:`truncate`), and the first training
    record a writer writes (``train_iter`` or ``train_epoch`` of 1-based epoch ``e``) first drops
    every record of epoch ``e`` or later and the ``final`` record — those of a run killed before
    it wrote the checkpoint this one starts after (for a run that starts from scratch, anything
    an earlier run in the folder wrote for its epochs), and a half-written last line."""

    FILE = "stats.jsonl"
    TRAINING = ("train_iter", "train_epoch")  # the records that say which epoch is being trained

    def __init__(self, out_dir, enabled=True):
        self.path = os.path.join(out_dir, self.FILE)
        self.enabled = enabled
        self._training_started = False

    def write(self, kind, **stats):
        if not self.enabled:
            return
        if kind in self.TRAINING and not self._training_started:
            self._training_started = True
            epoch = stats.get("epoch")
            if isinstance(epoch, int) and io.exists(self.path):
                dropped = self.truncate(epoch - 1)
                if dropped:
                    logger.info(
                        "%s: dropped %d records of epochs from %d on (an earlier run stopped before its checkpoint)",
                        self.path,
                        dropped,
                        epoch,
                    )
        record = {"_type": kind, **_clean(stats)}
        line = simplejson.dumps(record, sort_keys=False) + "\n"
        with io.write_errors(self.path, "stats file"), io.open_path(self.path, "a") as f:
            f.write(line)

    def read(self, kind=None):
        """The records written so far (optionally only those of one ``_type``)."""
        if not self.enabled or not io.exists(self.path):
            return []
        return read_stats(self.path, kind)

    def truncate(self, epochs_done, keep_final=False):
        """Keep only the records of the first ``epochs_done`` epochs (a resumed run writes the
        later ones again, so each is in the file once) and the ``final`` record only with
        ``keep_final``; returns how many were dropped."""
        if not self.enabled or not io.exists(self.path):
            return 0
        with io.open_path(self.path, "r") as f:
            text = f.read()
        records = _parse_stats(text, self.path)
        keep = [
            r
            for r in records
            if (keep_final or r.get("_type") != "final") and (r.get("epoch") is None or r["epoch"] <= epochs_done)
        ]
        if len(keep) != len(records) or (text and not text.endswith("\n")):  # or a half-written last line
            text = "".join(simplejson.dumps(r, sort_keys=False) + "\n" for r in keep)
            io.write_text_atomic(self.path, text, what="stats file")
        return len(records) - len(keep)


def read_stats(path, kind=None):
    """The records of a ``stats.jsonl`` file (optionally only those of one ``_type``)."""
    with io.open_path(path, "r") as f:
        return _parse_stats(f.read(), path, kind)


def _parse_stats(text, path, kind=None):
    records = []
    lines = text.split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = simplejson.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # the unfinished last line of a running or killed job
                break
            raise DataError(f"{path}:{n + 1}: not a JSON stats record") from None
        if kind is None or rec.get("_type") == kind:
            records.append(rec)
    return records


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
