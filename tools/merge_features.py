#!/usr/bin/env python3
"""Merge feature stores (the shards of one extraction, or any stores of one model) into one store.

python tools/merge_features.py SHARD_DIR [SHARD_DIR ...] --output DIR [--dtype float16]
"""

from metric.retrieval.store import STORE_DTYPES, check_dtype, load_features, merge_stores
from metric.utils.cli import add_dtype_option, add_verify_option, exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("stores", nargs="+", help="store folders; shard stores are put in shard order")
    parser.add_argument("--output", required=True, help="merged store folder to write")
    add_verify_option(parser)
    add_dtype_option(parser, STORE_DTYPES, default=None, help_extra="; default: the inputs' (which must agree)")
    args = parser.parse_args(argv)
    check_distinct_paths([("--output", args.output)], stores=[(s, s) for s in args.stores])
    path = merge_stores(
        args.stores,
        args.output,
        dtype=None if args.dtype is None else check_dtype(args.dtype),
        verify=not args.no_verify,
    )
    store = load_features(path, verify=not args.no_verify)
    failed = len(store.meta.get("failed_images", []))
    print(
        f"merged {len(args.stores)} stores: {len(store)} x {store.dim} {store.dtype} features into {path} "
        f"({failed} failed images)"
    )


if __name__ == "__main__":
    exit_tool(run_tool(main))
