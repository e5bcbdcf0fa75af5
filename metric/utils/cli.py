"""Shared plumbing for the thin command-line tools in ``tools/``.

A tool defines ``main(argv)`` and ends with ``exit_tool(run_tool(main))``.
User errors (:class:`~metric.utils.errors.MetricError`) become one line on
stderr and exit status 2; Ctrl-C becomes exit status 130; bugs keep their
traceback. A write fault that escaped the writers' own checks (an ``OSError`` such as a full
disk, a read-only file system or a missing permission, possibly wrapped by a library) is a
user error too: one line naming the path and the cause, exit status 2.
"""

import argparse
import errno
import os
import sys

from metric.utils.errors import MetricError
from metric.utils.io import describe_os_error, find_os_error
from metric.utils.logger import setup_logging

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# OS errors that are a fault of the environment (not a bug): reported in one line by run_tool.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2.

    With ``config=True`` every token that is not one of the tool's options is collected, in
    order, as the ``KEY VALUE`` config overrides (``args.opts``), so options may come before,
    between or after the overrides.
    """

    takes_config = False

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USER_ERROR)

    def _check_options(self, args):
        """An unknown ``--option`` (an abbreviation of a known one included) is the error, even
        when required arguments are missing too (argparse would report those first)."""
        for token in args:
            if token == "--":
                return
            name = token.split("=", 1)[0]
            if name.startswith("--") and name not in self._option_string_actions:
                near = sorted(o for o in self._option_string_actions if o.startswith(name) and o.startswith("--"))
                hint = f" (did you mean {' or '.join(near)}?)" if near else ""
                self.error(f"unrecognized option {name}{hint}")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self._check_options(args)
        if not self.takes_config:
            return super().parse_args(args, namespace)
        ns, rest = self.parse_known_args(args, namespace)
        unknown = [t for t in rest if t.startswith("--")]
        if unknown:
            self.error(f"unrecognized option {unknown[0]}")
        ns.opts = rest
        return ns


def make_parser(description, config=True):
    """An argument parser; with ``config=True`` it takes ``--cfg FILE`` and ``KEY VALUE`` overrides.
    Options are matched exactly (no prefixes): an abbreviation is an unknown option."""
    parser = _ArgumentParser(
        description=description,
        allow_abbrev=False,  # --no-progres is an error, not --no-progress: an option must be spelled out
        epilog="Config overrides are KEY VALUE pairs, e.g. OPTIM.BASE_LR 0.01 (see docs/CONFIG.md)."
        if config
        else None,
    )
    if config:
        parser.takes_config = True
        parser.add_argument("--cfg", dest="cfg_file", default=None, help="yaml config file")
    return parser


def add_verify_option(parser):
    """``--no-verify`` for a tool that reads feature stores: ``args.no_verify``; the tool passes
    ``verify=not args.no_verify`` to what loads the stores."""
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking stores against their meta.json (digest, finite rows, norms): "
        "for trusted stores, saves one read of each",
    )


def add_dtype_option(parser, dtypes, default="float32", help_extra=""):
    """``--dtype`` for a tool that writes feature stores; ``dtypes`` are the store precisions
    (:data:`metric.retrieval.store.STORE_DTYPES`, float32 first). The value is not checked here:
    the tool passes it to :func:`metric.retrieval.store.check_dtype`, whose error names them."""
    parser.add_argument(
        "--dtype",
        default=default,
        help=f"precision of the store written: {' or '.join(dtypes)} (half the disk and page "
        "cache; searched exactly, accumulating in float32)" + help_extra,
    )


def one_line(err):
    """The message of a user error. One raised in a DataLoader worker comes back from torch as
    "Caught DataError in DataLoader worker process 0." followed by the worker's traceback: its last
    line holds the original message."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name = type(err).__module__ + "." + type(err).__qualname__ + ": "
        text = last[len(name) :] if last.startswith(name) else last
    return text


def exit_tool(status):
    """End a tool's process with ``status`` (a tool ends with ``exit_tool(run_tool(main))``). A
    process that joined a process group (a torchrun rank) exits without interpreter finalization
    (:func:`metric.utils.distributed.end_process`)."""
    du = sys.modules.get("metric.utils.distributed")  # loaded by every tool that can join a group
    if du is not None and du.joined_a_group():
        du.end_process(status)
    sys.exit(status)


def run_tool(main, argv=None):
    """Run ``main(argv)`` and map its outcome to an exit status. Logging goes to stdout
    (warnings and progress; ``main`` may reconfigure it, e.g. to add a log file)."""
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    try:
        status = main(argv)
    except MetricError as err:
        # An error every process finds alike (metric.engine.precheck) is printed by local rank 0
        # of each node only; the other torchrun ranks exit quietly.
        if not (getattr(err, "every_rank", False) and os.environ.get("LOCAL_RANK", "0") != "0"):
            sys.stderr.write(f"error: {one_line(err)}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:
        err = find_os_error(exc)
        if err is None or err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write"  # reads may be denied too
        where = f" {err.filename}" if err.filename else ""
        sys.stderr.write(f"error: cannot {verb}{where}: {describe_os_error(err)}\n")
        return EXIT_USER_ERROR
    return 0 if status is None else int(status)
