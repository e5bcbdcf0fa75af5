"""Collect what the runs of a sweep recorded into ROOT_DIR/NAME/sweep.jsonl and print a status
table (done / running / failed / pending); safe while the sweep runs (docs/SWEEPS.md).

python tools/sweep_collect.py --sweep-cfg configs/sweeps/demo_margins.yaml
"""

from metric.sweep.collect import collect, format_table, write_jsonl
from metric.sweep.config import load_sweep_cfg, sweep_parser
from metric.sweep.jobs import open_sweep
from metric.utils.cli import exit_tool, run_tool


def main(argv=None):
    parser = sweep_parser("Collect the records of a sweep's runs and print their status.")
    args = parser.parse_args(argv)
    c = load_sweep_cfg(args.sweep_cfg, args.opts)
    root = open_sweep(c)
    records = collect(root)
    path = write_jsonl(root, records)
    print(format_table(records, c.ANALYZE.METRIC, c.ANALYZE.PICK))
    print(f"records: {path}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
