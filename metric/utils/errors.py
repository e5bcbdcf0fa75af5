"""Error classes for mistakes made by the user (as opposed to bugs).

Every user-facing mistake (bad config value, missing file, malformed list line,
incompatible checkpoint, ...) raises a subclass of :class:`MetricError` with a
one-line message that names the offending thing and says how to fix it.
Command-line tools catch these, print the line to stderr and exit with status 2
(see :func:`metric.utils.cli.run_tool`). Bugs keep raising ordinary exceptions.
"""


class MetricError(Exception):
    """Base class of all user errors."""


class ConfigError(MetricError):
    """A config key is unknown, has the wrong type or a value outside its allowed set."""


class DataError(MetricError):
    """A data set, list file or image cannot be used as given."""


class CheckpointError(MetricError):
    """A checkpoint or weights file cannot be read or does not fit the model."""


class TrainingError(MetricError):
    """Training cannot continue (for instance the loss became non-finite)."""


class FeatureStoreError(MetricError):
    """A feature store is missing, incomplete or inconsistent."""


class ExportError(MetricError):
    """A model cannot be exported or the exported model disagrees with PyTorch."""


class OutputError(MetricError):
    """An output cannot be written: its folder is missing or not writable, the path is of the
    wrong kind, or the write failed (full disk, read-only file system, permission denied)."""


class OutputBusyError(OutputError):
    """An output (a training OUT_DIR, a feature store) is locked by another run that writes it."""


class DistributedError(MetricError):
    """A process group cannot be joined, or a collective failed because a peer process died, was
    stopped or is stuck (it timed out after ``DIST.TIMEOUT_S`` or lost its connection)."""


class ExecutorError(MetricError):
    """A job executor cannot be used: its commands are missing (SLURM's ``sbatch`` not on PATH)
    or it refused a submission (``sbatch`` said why)."""
