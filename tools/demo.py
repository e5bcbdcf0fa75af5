"""The end-to-end demo (``make demo``): data, untrained vs trained retrieval on held-out classes."""

from metric.engine.demo import DEMO_CONFIG, format_table, run_demo
from metric.utils.cli import exit_tool, make_parser, run_tool


def main(argv=None):
    parser = make_parser("Run the CPU demo: generate data, train, compare retrieval before/after.")
    args = parser.parse_args(argv)
    result = run_demo(args.cfg_file or DEMO_CONFIG, args.opts)
    print()
    print(format_table(result))
    print("\nrecall@1, mAP@R: each held-out image queries all others (by label); GLR mAP@100: held-out")
    print("queries searched in the held-out index, scored with the Kaggle metric on retrieval_solution.csv")
    print(f"model, logs and stats: {result['out_dir']}  (checkpoint {result['checkpoint']})")
    if result["gallery"]:
        print(f"result gallery: {result['gallery']}")
    print(f"training curves: {result['curves']}  (TensorBoard: tensorboard --logdir {result['out_dir']}/tb)")


if __name__ == "__main__":
    exit_tool(run_tool(main))
