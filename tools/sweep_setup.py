"""Set up a sweep: sample its configs and write ROOT_DIR/NAME/cfgs/NNNNNN.yaml (docs/SWEEPS.md).

python tools/sweep_setup.py --sweep-cfg configs/sweeps/demo_margins.yaml
"""

from metric.sweep.config import load_sweep_cfg, sweep_dir, sweep_parser
from metric.sweep.setup import format_summary, setup_sweep
from metric.utils.cli import exit_tool, run_tool


def main(argv=None):
    parser = sweep_parser("Sample the configs of a sweep and write them.")
    args = parser.parse_args(argv)
    c = load_sweep_cfg(args.sweep_cfg, args.opts)
    summary = setup_sweep(c)
    print(format_summary(summary, sweep_dir(c)))


if __name__ == "__main__":
    exit_tool(run_tool(main))
