"""Convert an ONNX model to a TensorFlow SavedModel (and TFLite) with onnx2tf, checked against onnxruntime.

    python tools/onnx2tf.py model.onnx OUTDIR [--tflite] [--fp16] [--nchw] [--image IMG]

Runs in the TensorFlow environment .venv-tf (create it with: bash tools/setup_tf_env.sh), fully
offline. OUTDIR gets the SavedModel at its root (serving_default: input NHWC, or NCHW with
--nchw -> {'embedding'}), model_float32.tflite with --tflite, model_float16.tflite with --fp16,
and pymetric_export.json with the measured differences. An existing OUTDIR is replaced only if
this tool wrote it. Fails if an fp32 model differs from onnxruntime by more than 1e-4 relative.
"""

from metric.export import parse_tool_args
from metric.export.onnx import format_results, read_image
from metric.export.tensorflow import convert_onnx_to_tf
from metric.utils.cli import exit_tool, run_tool
from metric.utils.io import check_distinct_paths


def _flags(parser):
    parser.add_argument("onnx", help="ONNX file written by tools/torch2onnx.py (or any [N, 3, H, W] -> [N, D] model)")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--tflite", action="store_true", help="also write model_float32.tflite")
    parser.add_argument("--fp16", action="store_true", help="also write model_float16.tflite (implies --tflite)")
    parser.add_argument("--nchw", action="store_true", help="keep the ONNX NCHW input layout (default: NHWC)")
    parser.add_argument(
        "--check-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(96, 128),
        help="size of the check inputs for a model with dynamic height/width (default 96 128)",
    )
    parser.add_argument("--image", help="a real image to check on (default: a built-in sample photo)")


def main(argv=None):
    args = parse_tool_args(__doc__.splitlines()[0], _flags, argv, config=False)
    check_distinct_paths([("OUTDIR", args.out_dir)], [("the ONNX file", args.onnx), ("--image", args.image)])
    image = read_image(args.image) if args.image else None
    report = convert_onnx_to_tf(args.onnx, args.out_dir, args.tflite, args.fp16, args.nchw, args.check_size, image)
    for line in format_results(report["checks"]):
        print(line)
    sig = report["signature"]["serving_default"]
    io = ", ".join(f"{k} {v['dtype']} {v['shape']}" for part in ("inputs", "outputs") for k, v in sig[part].items())
    t = report["timings_s"]
    print(f"wrote {args.out_dir}: {', '.join(report['files'])} (serving_default: {io}; {t['total']:.0f} s)")


if __name__ == "__main__":
    exit_tool(run_tool(main))
