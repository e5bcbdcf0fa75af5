"""Generate the deterministic demo data set (see docs/DEMO_DATA.md).

    python tools/make_demo_data.py                      # -> <repo>/metric/datasets/data/demo
    python tools/make_demo_data.py --output /tmp/demo --seed 1 --image-size 64

Does nothing when the folder already holds demo data made with the same parameters.
"""

import inspect
import logging
from pathlib import Path

import metric
from metric.datasets.demo import make_demo_dataset
from metric.utils.cli import exit_tool, make_parser, run_tool


def default_output():
    """``<repo root>/metric/datasets/data/demo``: where configs/metric/demo_cpu.yaml looks."""
    repo_root = Path(metric.__file__).resolve().parent.parent
    return repo_root / "metric" / "datasets" / "data" / "demo"


def main(argv=None):
    parser = make_parser("Generate the deterministic landmark-like demo data set.", config=False)
    defaults = inspect.signature(make_demo_dataset).parameters
    parser.add_argument("--output", default=None, help=f"output folder (default: {default_output()})")
    parser.add_argument(
        "--seed", type=int, default=defaults["seed"].default, help=f"random seed (default: {defaults['seed'].default})"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing folder made with other parameters"
    )
    sizes = {
        "num_train_classes": "training scenes",
        "train_per_class": "views per training scene",
        "num_heldout_classes": "held-out scenes with queries",
        "queries_per_class": "queries per held-out scene",
        "index_per_class": "index images per held-out or distractor scene",
        "num_distractor_classes": "index-only scenes without queries",
        "image_size": "image side in pixels",
    }
    for name, text in sizes.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, default=None, help=f"{text} (default: {defaults[name].default})"
        )
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)

    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    kwargs = {name: getattr(args, name) for name in sizes if getattr(args, name) is not None}
    output = args.output if args.output is not None else default_output()
    summary = make_demo_dataset(output, seed=args.seed, overwrite=args.overwrite, **kwargs)
    c = summary["counts"]
    state = "generated" if summary["created"] else "already present"
    print(
        f"demo data {state} in {summary['out_dir']}: {c['train_images']} train images "
        f"({c['train_classes']} classes), {c['query_images']} queries (+{c['ignored_queries']} ignored), "
        f"{c['index_images']} index images "
        f"({c['heldout_classes']} + {c['distractor_classes']} distractor classes)"
    )
    return 0


if __name__ == "__main__":
    exit_tool(run_tool(main))
