"""Plot the curves of training runs (loss, learning rate, recall@1, mAP@R) from their stats.jsonl.

    python tools/plot_stats.py OUT_DIR [OUT_DIR ...] [--output curves.png] [--x epoch|iteration]

Several runs share one figure, with a legend (to compare runs). A running or killed job's
stats.jsonl works too: its unfinished last line is skipped.
"""

from metric.utils.cli import exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths
from metric.utils.stats_plot import X_CHOICES, plot_runs, stats_file


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("runs", nargs="+", metavar="OUT_DIR", help="training output folders (or stats.jsonl files)")
    parser.add_argument("--output", default="curves.png", help="PNG file to write (default curves.png)")
    parser.add_argument("--x", choices=X_CHOICES, default="epoch", help="x axis (default epoch)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    check_distinct_paths([("--output", args.output)], [(stats_file(run), stats_file(run)) for run in args.runs])
    print(f"wrote {plot_runs(args.runs, args.output, x=args.x, title=args.title)}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
