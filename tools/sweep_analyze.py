"""Write ROOT_DIR/NAME/analysis.html for a sweep: configs ranked by ANALYZE.METRIC (mean ± std over
seeds), the top two against seed noise, EDF, metric vs each sampled key, training curves of the
best and worst config (docs/SWEEPS.md). Collects the runs first (sweep.jsonl is rewritten).

python tools/sweep_analyze.py --sweep-cfg configs/sweeps/demo_margins.yaml
"""

from metric.sweep.analyze import analyze, group_configs
from metric.sweep.collect import collect, write_jsonl
from metric.sweep.config import load_sweep_cfg, sweep_parser
from metric.sweep.jobs import open_sweep
from metric.utils.cli import exit_tool, run_tool


def main(argv=None):
    parser = sweep_parser("Write the HTML analysis of a sweep.")
    args = parser.parse_args(argv)
    c = load_sweep_cfg(args.sweep_cfg, args.opts)
    root = open_sweep(c)
    records = collect(root)
    write_jsonl(root, records)
    path = analyze(c, root, records)
    groups, _ = group_configs(records, c.ANALYZE.METRIC, c.ANALYZE.PICK, c.ANALYZE.HIGHER_IS_BETTER)
    keys = list(c.SETUP.SAMPLERS)
    which = "last epoch's training loss" if c.ANALYZE.METRIC == "loss" else f"{c.ANALYZE.PICK} evaluation"
    print(f"{c.ANALYZE.METRIC} ({which}), configs best first, mean ± std over seeds:")
    for g in groups:
        std = f"{g['std']:.4f}" if g["std"] is not None else "  -   "
        values = "  ".join(f"{k}={g['values'].get(k)}" for k in keys)
        print(f"  {g['mean']:.4f} ± {std}  n={g['n']}  {values}")
    print(f"analysis: {path}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
