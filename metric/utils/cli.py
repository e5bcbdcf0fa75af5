"""Shared plumbing for the thin command-line tools in ``tools/``.

A tool defines ``main(argv)`` and ends with ``sys.exit(run_tool(main))``.
User errors (:class:`~metric.utils.errors.MetricError`) become one line on
stderr and exit status 2; Ctrl-C becomes exit status 130; bugs keep their
traceback.
"""

import argparse
import os
import sys

from metric.utils.errors import MetricError
from metric.utils.logger import setup_logging

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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

    def parse_args(self, args=None, namespace=None):
        if not self.takes_config:
            return super().parse_args(args, namespace)
        ns, rest = self.parse_known_args(args, namespace)
        unknown = [t for t in rest if t.startswith("--")]
        if unknown:
            self.error(f"unrecognized option {unknown[0]}")
        ns.opts = rest
        return ns


def make_parser(description, config=True):
    """An argument parser; with ``config=True`` it takes ``--cfg FILE`` and ``KEY VALUE`` overrides."""
    parser = _ArgumentParser(
        description=description,
        epilog="Config overrides are KEY VALUE pairs, e.g. OPTIM.BASE_LR 0.01 (see docs/CONFIG.md)." if config else None,
    )
    if config:
        parser.takes_config = True
        parser.add_argument("--cfg", dest="cfg_file", default=None, help="yaml config file")
    return parser


def run_tool(main, argv=None):
    """Run ``main(argv)`` and map its outcome to an exit status. Logging goes to stdout
    (warnings and progress; ``main`` may reconfigure it, e.g. to add a log file)."""
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    try:
        status = main(argv)
    except MetricError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    return 0 if status is None else int(status)
