"""Export a trained model to ONNX (embedding only, eval mode) and check it with onnxruntime.

    python tools/torch2onnx.py --cfg CFG TEST.WEIGHTS W --output model.onnx [--opset N] [--size H W] [--dynamic]

The input is float32 NCHW (RGB, [0, 1] then ImageNet mean/std) with a dynamic batch axis; with
--dynamic also dynamic height and width. --size defaults to TRAIN.IM_SIZE (the evaluation crop).
The file is written only if onnxruntime agrees with PyTorch (relative difference <= 1e-4) on random
input and on a real image (--image, default a built-in sample photo). See docs/EXPORT.md.
"""

from metric.config import load_cfg
from metric.export import parse_tool_args
from metric.export.onnx import DEFAULT_OPSET, export_checked_onnx, format_results, read_image
from metric.utils.cli import exit_tool, run_tool
from metric.utils.io import check_distinct_paths


def _flags(parser):
    parser.add_argument("--output", help="ONNX file to write (required)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default TRAIN.IM_SIZE)")
    parser.add_argument("--dynamic", action="store_true", help="dynamic height and width")
    parser.add_argument("--image", help="a real image to check on (default: a built-in sample photo)")


def main(argv=None):
    args = parse_tool_args(__doc__.splitlines()[0], _flags, argv, required=("output",))
    cfg = load_cfg(args.cfg_file, args.opts)
    check_distinct_paths(
        [("--output", args.output)],
        [("--cfg", args.cfg_file), ("TEST.WEIGHTS", cfg.TEST.WEIGHTS), ("--image", args.image)],
    )
    image = read_image(args.image) if args.image else None
    sig, results = export_checked_onnx(cfg, args.output, args.size, args.opset, args.dynamic, image)
    for line in format_results(results):
        print(line)
    shape = " x ".join("?" if d is None else str(d) for d in sig["shape"])
    print(
        f"wrote {args.output}: input '{sig['input']}' {shape}, output '{sig['output']}' N x {sig['dim']}, "
        f"opset {args.opset}"
    )


if __name__ == "__main__":
    exit_tool(run_tool(main))
