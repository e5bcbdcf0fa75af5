"""Build a Google Landmark Retrieval 2020 submission: a zipped SavedModel, image -> global descriptor.

    python tools/make_kaggle_model.py --cfg CFG TEST.WEIGHTS W --output submission.zip [--image IMG]

The SavedModel's serving signature takes one RGB image as uint8 [H, W, 3] of any size and returns
{'global_descriptor': float32 [D]} (L2-normalized); our preprocessing (longer side resized to
TEST.IM_SIZE keeping the aspect ratio, ImageNet normalization) is inside the graph. Needs the
TensorFlow environment .venv-tf (bash tools/setup_tf_env.sh). Written only if its descriptors of
real images match our PyTorch extraction (cosine >= 0.9999). See docs/EXPORT.md.
"""

from metric.config import load_cfg
from metric.export import parse_tool_args
from metric.export.kaggle import make_kaggle_model
from metric.export.onnx import format_results, read_image
from metric.utils.cli import exit_tool, run_tool
from metric.utils.io import check_distinct_paths


def _flags(parser):
    parser.add_argument("--output", help="submission zip to write (required)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset of the intermediate model")
    parser.add_argument("--image", help="an extra real image to check on")


def main(argv=None):
    args = parse_tool_args(__doc__.splitlines()[0], _flags, argv, required=("output",))
    cfg = load_cfg(args.cfg_file, args.opts)
    check_distinct_paths(
        [("--output", args.output)],
        [("--cfg", args.cfg_file), ("TEST.WEIGHTS", cfg.TEST.WEIGHTS), ("--image", args.image)],
    )
    image = read_image(args.image) if args.image else None
    report = make_kaggle_model(cfg, args.output, image, args.opset)
    for line in format_results(report["checks"]):
        print(line)
    mb = report["zip_bytes"] / 2**20
    print(
        f"wrote {report['output']} ({mb:.1f} MiB): serving_default(input_image uint8 [H, W, 3]) -> "
        f"global_descriptor float32 [{report['dim']}], longer side {report['max_side']}"
    )


if __name__ == "__main__":
    exit_tool(run_tool(main))
