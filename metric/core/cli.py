"""Shared plumbing for the thin command-line tools in ``tools/``.

A tool defines ``main(argv)`` and ends with ``sys.exit(run_tool(main))``.
User errors (:class:`~metric.core.errors.MetricError`) become one line on
stderr and exit status 2; Ctrl-C becomes exit status 130; bugs keep their
traceback.
"""

import argparse
import sys

from metric.core.errors import MetricError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USER_ERROR)


def make_parser(description, config=True):
    """An argument parser; with ``config=True`` it takes ``--cfg FILE`` and trailing ``KEY VALUE`` pairs."""
    parser = _ArgumentParser(description=description)
    if config:
        parser.add_argument("--cfg", dest="cfg_file", default=None, help="yaml config file")
        parser.add_argument(
            "opts",
            nargs=argparse.REMAINDER,
            default=[],
            help="config overrides as KEY VALUE pairs, e.g. OPTIM.BASE_LR 0.01",
        )
    return parser


def run_tool(main, argv=None):
    """Run ``main(argv)`` and map its outcome to an exit status."""
    try:
        status = main(argv)
    except MetricError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    return 0 if status is None else int(status)
