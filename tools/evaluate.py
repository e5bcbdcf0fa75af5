"""Score retrieval results: Google Landmark Retrieval, revisited Oxford/Paris, or labelled sets.

Modes (chosen by the arguments):

    GLR mAP@100:     --results results.csv --gt retrieval_solution.csv
    ROxford/RParis:  --query QDIR --index IDIR --gt gnd_roxford5k.pkl
    labelled sets:   --query QDIR --query-labels FILE [--index IDIR --index-labels FILE]

Labelled sets under torchrun (or with --shard, or an index folder of shard stores) are ranked by
the sharded exact search of tools/search.py (docs/RETRIEVAL.md "Sharded search"): galleries that
do not fit one process are scored, with the metrics of a single process.

Prints a table; ``--json FILE`` also writes the metrics (fractions in [0, 1]).
"""

import os

from metric.retrieval.metrics import check_json_path, evaluate, format_table, write_json
from metric.retrieval.sharded import wants_sharding
from metric.retrieval.sharded_pipeline import DEFAULT_TIMEOUT_S, check_timeout, evaluate_labelled_sharded
from metric.utils.cli import add_verify_option, exit_tool, make_parser, run_tool
from metric.utils.errors import MetricError
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
    parser.add_argument(
        "--shard",
        default=None,
        choices=("index", "queries"),
        help="labelled sets: rank with the sharded search, cutting the index or the queries over the processes "
        "(default under torchrun: index)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"sharded: seconds a process waits for the others before it stops (default {DEFAULT_TIMEOUT_S})",
    )
    add_verify_option(parser)
    args = parser.parse_args(argv)
    check_timeout(args.timeout)
    sharded = args.shard is not None or wants_sharding(args.index)
    if args.json:
        check_distinct_paths(
            [("--json", args.json)],
            [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in ("results", "gt", "query_labels", "index_labels")],
            stores=[("--query", args.query), ("--index", args.index)],
        )
        check_json_path(args.json)

    if sharded:
        problem = None
        if args.query is None or args.query_labels is None or args.results or args.gt:
            problem = (
                "sharded evaluation (torchrun, --shard or an index of shard stores) scores labelled sets only: "
                "give --query and --query-labels [--index and --index-labels]"
            )
        elif (args.index is None) != (args.index_labels is None):
            problem = "give --index and --index-labels together, or neither (leave-one-out)"
        if problem:
            err = MetricError(problem)
            err.every_rank = True  # every process finds it: printed once per machine
            raise err
        mode = "labelled"
        metrics = evaluate_labelled_sharded(
            args.query,
            args.query_labels,
            args.index,
            args.index_labels,
            verify=not args.no_verify,
            shard=args.shard or "index",
            timeout_s=args.timeout,
        )
        if os.environ.get("RANK", "0") != "0":  # rank 0 prints and writes
            return
        print(format_table(mode, metrics))
        if args.json:
            print(f"wrote {write_json(args.json, metrics)}")
        return
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
    exit_tool(run_tool(main))
