#!/usr/bin/env python3
"""Turn descriptors made elsewhere (an .npy [N, D] and an ids file) into a feature store.

python tools/import_features.py --embeddings X.npy --ids ids.txt --output DIR [--no-normalize] [--dtype float16]
"""

from metric.retrieval.store import STORE_DTYPES, check_dtype, import_features
from metric.utils.cli import add_dtype_option, exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--embeddings", required=True, help=".npy file with a float array [N, D]")
    parser.add_argument("--ids", required=True, help="text file with N ids, one per line, in row order")
    parser.add_argument("--output", required=True, help="store folder to write (an existing store is replaced)")
    parser.add_argument("--no-normalize", action="store_true", help="store rows as given (already L2-normalized)")
    add_dtype_option(parser, STORE_DTYPES)
    args = parser.parse_args(argv)
    dtype = check_dtype(args.dtype)
    check_distinct_paths([("--output", args.output)], [("--embeddings", args.embeddings), ("--ids", args.ids)])
    store = import_features(args.embeddings, args.ids, args.output, normalize=not args.no_normalize, dtype=dtype)
    print(f"imported {len(store)} x {store.dim} features ({store.dtype}) into {store.path}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
