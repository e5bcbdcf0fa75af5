"""Extract L2-normalized descriptors of images into a feature store.

    python tools/extract_features.py --cfg CFG TEST.WEIGHTS W INFER.INPUT SRC INFER.OUTPUT DIR \
        [INFER.SCALES "[0.7071, 1.0, 1.4142]" INFER.FLIP True] [INFER.TOTAL_NUM N INFER.CUT_NUM k] [--dtype float16]
    torchrun --nproc_per_node=G tools/extract_features.py --cfg CFG ...   # one shard per rank, merged

SRC is a list file or an image folder; see docs/RETRIEVAL.md. INFER.BOXES list (lines "path x1 y1 x2 y2")
or INFER.BOXES gnd_roxford5k.pkl crops each image to its box first (the revisited Oxford/Paris queries).
"""

from metric.config import load_cfg
from metric.engine.extract import extract_features
from metric.retrieval.store import STORE_DTYPES, check_dtype
from metric.utils.cli import add_dtype_option, exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def main(argv=None):
    parser = make_parser("Extract descriptors of images into a feature store.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dtype_option(parser, STORE_DTYPES)
    args = parser.parse_args(argv)
    dtype = check_dtype(args.dtype)
    cfg = load_cfg(args.cfg_file, args.opts)
    check_distinct_paths(
        [("INFER.OUTPUT", cfg.INFER.OUTPUT)],
        [("INFER.INPUT", cfg.INFER.INPUT), ("TEST.WEIGHTS", cfg.TEST.WEIGHTS), ("--cfg", args.cfg_file)],
    )
    out = extract_features(cfg, progress=not args.no_progress, dtype=dtype)
    print(f"feature store: {out}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
