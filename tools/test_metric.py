"""Evaluate retrieval on the TEST split (recall@k and mAP@R by label).

    python tools/test_metric.py --cfg configs/metric/demo_cpu.yaml TEST.WEIGHTS output/demo/checkpoints/model_epoch_0008.pyth
"""

import json
import sys

from metric.core.cli import make_parser, run_tool
from metric.core.config import load_cfg
from metric.core.evaluator import evaluate_model, format_metrics


def main(argv=None):
    parser = make_parser("Evaluate retrieval of a model on the TEST split.")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_cfg(args.cfg_file, args.opts)
    metrics = evaluate_model(cfg)
    print(format_metrics(metrics))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    sys.exit(run_tool(main))
