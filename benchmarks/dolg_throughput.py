"""Training throughput of the DOLG head against the GeM head on the same config.

    python benchmarks/dolg_throughput.py [--cfg configs/metric/demo_cpu.yaml] [--rounds 5] [--iters 10]

Each variant (GeM LinearHead, DOLG, DOLG with the multi-atrous module) runs full training steps
(forward with labels, cross entropy, backward, SGD step) on random batches of the config's
TRAIN.BATCH_SIZE and TRAIN.IM_SIZE, so only the model's cost is measured (no data loading). The
variants take turns, ``--rounds`` times, so that a change in the machine's load hits all of them;
the table shows the median img/s and the ratio to GeM. Not a test: timings are never asserted.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metric.config import load_cfg
from metric.modeling import build_model

VARIANTS = {
    "GeM (LinearHead)": ["MODEL.HEADS.NAME", "LinearHead", "MODEL.HEADS.POOL_LAYER", "gempool"],
    "DOLG": ["MODEL.HEADS.NAME", "DOLGHead", "MODEL.DOLG.MULTI_ATROUS", "False"],
    "DOLG + multi-atrous": ["MODEL.HEADS.NAME", "DOLGHead", "MODEL.DOLG.MULTI_ATROUS", "True"],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--cfg", default="configs/metric/demo_cpu.yaml")
    p.add_argument("--rounds", type=int, default=5, help="turns per variant (the median is shown)")
    p.add_argument("--iters", type=int, default=10, help="timed training steps per turn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    return p.parse_args()


def make_step(cfg, device):
    torch.manual_seed(cfg.RNG_SEED)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n, s = cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.IM_SIZE
    x = torch.randn(n, 3, s, s, device=device)
    y = torch.randint(0, cfg.MODEL.HEADS.NUM_CLASSES, (n,), device=device)

    def step():
        logits, _ = model(x, y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    params = sum(p.numel() for p in model.parameters())
    return step, params


def timed(step, iters, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, rates = {}, {}
    for name, opts in VARIANTS.items():
        cfg = load_cfg(args.cfg, list(args.opts) + opts)
        steps[name] = make_step(cfg, args.device)
        steps[name][0]()  # warm-up
        steps[name][0]()
        rates[name] = []
    batch = cfg.TRAIN.BATCH_SIZE
    for _ in range(args.rounds):
        for name, (step, _) in steps.items():
            rates[name].append(args.iters * batch / timed(step, args.iters, args.device))
    base = statistics.median(rates["GeM (LinearHead)"])
    print(
        f"{args.cfg} {' '.join(args.opts)}: batch {batch}, {cfg.TRAIN.IM_SIZE} px, {args.device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.iters} steps"
    )
    print(f"{'head':<22}{'params':>10}{'img/s (median)':>16}{'min':>8}{'max':>8}{'vs GeM':>8}")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"{name:<22}{steps[name][1] / 1e6:>9.2f}M{med:>16.1f}{min(r):>8.1f}{max(r):>8.1f}{med / base:>8.2f}")


if __name__ == "__main__":
    main()
