"""Score retrieval results: Google Landmark Retrieval, revisited Oxford/Paris, or labelled sets.

Modes (chosen by the arguments):

    GLR mAP@100:     --results results.csv --gt retrieval_solution.csv
    ROxford/RParis:  --query QDIR --index IDIR --gt gnd_roxford5k.pkl
    labelled sets:   --query QDIR --query-labels FILE [--index IDIR --index-labels FILE]

Prints a table; ``--json FILE`` also writes the metrics (fractions in [0, 1]).
"""

import sys

from metric.retrieval.metrics import check_json_path, evaluate, format_table, write_json
from metric.utils.cli import add_verify_option, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--results", help="results CSV (id,images), GLR mode")
    parser.add_argument("--gt", help="ground truth: retrieval_solution.csv (GLR) or gnd_*.pkl (revisited)")
    parser.add_argument("--query", help="query feature store folder")
    parser.add_argument("--index", help="index feature store folder")
    parser.add_argument("--query-labels", help="labels of the query store: lines 'NAME LABEL'")
    parser.add_argument("--index-labels", help="labels of the index store: lines 'NAME LABEL'")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    add_verify_option(parser)
    args = parser.parse_args(argv)
    if args.json:
        check_distinct_paths(
            [("--json", args.json)],
            [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in ("results", "gt", "query_labels", "index_labels")],
            stores=[("--query", args.query), ("--index", args.index)],
        )
        check_json_path(args.json)

    mode, metrics = evaluate(
        results=args.results,
        gt=args.gt,
        query=args.query,
        index=args.index,
        query_labels=args.query_labels,
        index_labels=args.index_labels,
        verify=not args.no_verify,
    )
    print(format_table(mode, metrics))
    if args.json:
        print(f"wrote {write_json(args.json, metrics)}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
