"""Train a metric-learning model.

python tools/train_metric.py --cfg configs/metric/demo_cpu.yaml OUT_DIR output/demo
torchrun --nproc_per_node=8 tools/train_metric.py --cfg configs/metric/R-50-1x64d_step_8gpu.yaml
"""

from metric.config import load_cfg
from metric.engine.trainer import train_model
from metric.utils.cli import exit_tool, make_parser, run_tool


def main(argv=None):
    args = make_parser("Train a metric-learning model.").parse_args(argv)
    cfg = load_cfg(args.cfg_file, args.opts)
    train_model(cfg)


if __name__ == "__main__":
    exit_tool(run_tool(main))
