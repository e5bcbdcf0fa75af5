"""Evaluate retrieval on the TEST split (recall@k and mAP@R by label).

python tools/test_metric.py --cfg configs/metric/demo_cpu.yaml \
        TEST.WEIGHTS output/demo/checkpoints/model_epoch_0030.pyth
"""

from metric.config import load_cfg
from metric.engine.evaluator import evaluate_model, format_metrics
from metric.retrieval.metrics import check_json_path, write_json
from metric.utils.cli import exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def main(argv=None):
    parser = make_parser("Evaluate retrieval of a model on the TEST split.")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    cfg = load_cfg(args.cfg_file, args.opts)
    if args.json:  # before the work, not after it
        check_distinct_paths([("--json", args.json)], [("--cfg", args.cfg_file), ("TEST.WEIGHTS", cfg.TEST.WEIGHTS)])
        check_json_path(args.json)
    metrics = evaluate_model(cfg)
    print(format_metrics(metrics))
    if args.json:
        write_json(args.json, metrics)


if __name__ == "__main__":
    exit_tool(run_tool(main))
