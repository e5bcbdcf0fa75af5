"""Run a standard retrieval benchmark end to end and print the row a paper prints.

    python tools/benchmark.py --cfg CFG TEST.WEIGHTS W --benchmark NAME --data-root DIR \
        [--distractors DIR] [--features DIR] [--json FILE] [--allow-subset] [--dtype float16]
    python tools/benchmark.py --benchmark NAME --data-root DIR --make-lists OUT   # list files only

NAME: roxford5k, rparis6k (+r1m with --distractors), gldv2-retrieval, cub200, cars196, sop, inshop.
Conversion is cached and the feature stores (under --features, default OUT_DIR/benchmarks) are
reused, so a rerun only scores. See docs/BENCHMARKS.md.
"""

from metric.config import load_cfg
from metric.datasets.benchmarks.prepare import make_lists
from metric.engine.benchmark import run_benchmark
from metric.retrieval.store import STORE_DTYPES, check_dtype
from metric.utils import io
from metric.utils.cli import add_dtype_option, exit_tool, make_parser, run_tool


def main(argv=None):
    parser = make_parser("Run a standard retrieval benchmark and print its row.")
    parser.add_argument("--benchmark", required=True, help="benchmark name, e.g. roxford5k, rparis6k+r1m, cub200")
    parser.add_argument("--data-root", required=True, help="the benchmark's files as distributed")
    parser.add_argument("--distractors", help="revisitop1m.txt and its jpg/ tree (for NAME+r1m)")
    parser.add_argument("--features", help="folder of the feature stores and caches (default OUT_DIR/benchmarks)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--make-lists", metavar="OUT", help="only write the benchmark's list files into OUT")
    parser.add_argument(
        "--allow-subset",
        action="store_true",
        help="accept files whose counts differ from the distributed ones (a replica or part of the data); "
        "the row is marked as not comparable with published numbers",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_dtype_option(parser, STORE_DTYPES)
    args = parser.parse_args(argv)
    if args.make_lists:
        for path in make_lists(args.benchmark, args.data_root, args.make_lists, args.distractors, args.allow_subset):
            print(f"wrote {path}")
        return
    dtype = check_dtype(args.dtype)
    if args.json:
        io.check_output_path(args.json, "--json")
    cfg = load_cfg(args.cfg_file, args.opts)
    result = run_benchmark(
        cfg,
        args.benchmark,
        args.data_root,
        distractors=args.distractors,
        features=args.features,
        allow_subset=args.allow_subset,
        dtype=dtype,
        progress=not args.no_progress,
    )
    print(result["row"])
    if args.json:
        print(f"wrote {io.write_json_atomic(args.json, result, what='benchmark JSON', indent=2)}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
