"""Launch a sweep's runs (docs/SWEEPS.md): here (--executor local, the default) or as a SLURM job
array (--executor slurm). Launching again resumes: done runs are skipped, interrupted ones resume
from their checkpoint, failed ones are retried up to LAUNCH.MAX_RETRY times.

python tools/sweep_launch.py --sweep-cfg configs/sweeps/demo_margins.yaml
python tools/sweep_launch.py --sweep-cfg S --run-job 3     # one run (what each executor starts)
"""

import functools

from metric.sweep import jobs as J
from metric.sweep.config import load_sweep_cfg, sweep_parser
from metric.sweep.local import launch_local
from metric.sweep.run import run_job
from metric.utils.cli import exit_tool, run_tool
from metric.utils.errors import ConfigError

EXECUTORS = ("local", "slurm")


def main(argv=None):
    parser = sweep_parser("Launch the runs of a sweep.", "sweep config (yaml), set up with tools/sweep_setup.py")
    parser.add_argument(
        "--executor", default="local", help="local (this machine, the default) | slurm (sbatch job array)"
    )
    parser.add_argument("--run-job", type=int, default=None, metavar="I", help="run job I only, in this process")
    args = parser.parse_args(argv)
    if args.executor not in EXECUTORS:
        raise ConfigError(f"--executor {args.executor!r} is not allowed: expected one of {' | '.join(EXECUTORS)}")
    c = load_sweep_cfg(args.sweep_cfg, args.opts)
    if args.run_job is not None:
        return run_job(c, args.run_job, out=functools.partial(print, flush=True))  # a SLURM task's log: at once
    launch_slurm = None
    if args.executor == "slurm":  # checked before anything else: the same answer however far the sweep is
        if args.opts:
            raise ConfigError(
                "--executor slurm takes no KEY VALUE overrides: its tasks read the sweep config file; edit it"
            )
        from metric.sweep.slurm import launch_slurm, require_sbatch

        require_sbatch()
    root = J.open_sweep(c)
    jobs = J.pending_jobs(root, c.LAUNCH.MAX_RETRY)
    earlier = J.given_up_jobs(root, c.LAUNCH.MAX_RETRY)
    for job, status in earlier:
        line = status.get("last_line", "")
        print(f"not launched: job {job:06d} failed {status['failures']} times (LAUNCH.MAX_RETRY): {line}")
    # Exit status 1 whenever a run has given up (failed MAX_RETRY times), whichever the executor.
    if not jobs:
        print(f"nothing to launch: {J.num_jobs(root) - len(earlier)} of {J.num_jobs(root)} runs done in {root}")
        return 1 if earlier else 0
    if launch_slurm is not None:
        return launch_slurm(c, args.sweep_cfg, jobs) or (1 if earlier else 0)
    launcher = launch_local(c, jobs)
    return 1 if launcher.gave_up or earlier else 0


if __name__ == "__main__":
    exit_tool(run_tool(main))
