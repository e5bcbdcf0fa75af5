"""Regenerate docs/CONFIG.md from the comments in metric/config/defaults.py."""

import os

from metric.config.doc import render_config_doc
from metric.utils.cli import exit_tool, make_parser, run_tool
from metric.utils.io import write_text_atomic


def main(argv=None):
    parser = make_parser("Regenerate docs/CONFIG.md from metric/config/defaults.py.", config=False)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--output", default=os.path.join(repo, "docs", "CONFIG.md"))
    args = parser.parse_args(argv)
    write_text_atomic(args.output, render_config_doc(), what="config reference")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
