"""Training throughput: our trainer vs a bare hand-written PyTorch loop, and our cv2 data
pipeline vs an equivalent torchvision/PIL pipeline, measured in one run on the same data.

    python benchmarks/train_throughput.py [--depth 18] [--im-size 128] [--batch 32] [--epochs 2] [KEY VALUE ...]
    python benchmarks/train_throughput.py --compare-tensorboard [--log-period 10] [--rounds 3] ...

``--compare-tensorboard`` measures only our trainer, with TensorBoard event files on and off
(``LOG.TENSORBOARD``, logging every ``--log-period`` iterations), interleaved; the summary's
``tensorboard_ratio`` is images/s on / off (1.0: no overhead) by wall time, ``..._round_ratio``
the median of the ratios of adjacent on/off rounds, ``..._cpu_ratio`` the same by this process's
CPU time and ``..._in_call_ratio`` one minus the fraction of the wall time spent inside the
TensorBoard calls (the last two are the ones to trust on a loaded machine).

    python benchmarks/train_throughput.py --compare-compile [--rounds 3] [--epochs 2] ...

``--compare-compile`` measures only our trainer, eager vs ``TRAIN.COMPILE True``
(torch.compile), for ResNet-18 (``--depth``, ``--width``, ``--im-size``) and the tiny ViT of
``configs/metric/vit_tiny_cpu.yaml`` (at its 32 px), interleaved; each measurement is a fresh
trainer with one warm-up epoch (which holds the compilation: reported as ``compile_s``, the first
compiled warm-up epoch's extra seconds over an eager one; torch's on-disk cache of compiled code,
``/tmp/torchinductor_$USER``, makes it much shorter on a second run). The summary's
``*_compile_ratio`` is compiled / eager images/s.

Prints a table; the last line is a key=value summary (ratios > 1 mean ours is faster).
Not a test: timings are never asserted.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from metric.config import load_cfg
from metric.datasets.demo import make_demo_dataset
from metric.datasets.loader import build_train_loader, train_items
from metric.engine.trainer import Trainer
from metric.modeling import build_model
from metric.utils.distributed import DistInfo


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--width", type=int, default=32, help="RESNET.WIDTH_PER_GROUP and STEM_WIDTH")
    p.add_argument("--im-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--per-class", type=int, default=24)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per method (after one warm-up)")
    p.add_argument("--data", default=None, help="data folder (default: a temporary demo set)")
    p.add_argument(
        "--compare-tensorboard",
        action="store_true",
        help="only measure the trainer with TensorBoard on vs off (LOG.TENSORBOARD)",
    )
    p.add_argument("--log-period", type=int, default=10, help="LOG_PERIOD of --compare-tensorboard (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="on/off rounds of --compare-tensorboard (default 3)")
    p.add_argument(
        "--compare-compile",
        action="store_true",
        help="only measure the trainer eager vs TRAIN.COMPILE, ResNet and the tiny ViT",
    )
    p.add_argument(
        "opts",
        nargs="*",
        help="config overrides KEY VALUE applied last, e.g. another model: "
        "MODEL.TYPE vit MODEL.WIDTH 128 MODEL.LAYERS 2 MODEL.PATCH_SIZE 8 MODEL.EMB_DIM 64 "
        "MODEL.HEADS.POOL_LAYER identity",
    )
    return p.parse_args()


def make_cfg(args, data_dir, out_dir):
    opts = [
        "MODEL.DEPTH",
        args.depth,
        "RESNET.WIDTH_PER_GROUP",
        args.width,
        "RESNET.STEM_WIDTH",
        args.width,
        "MODEL.HEADS.IN_FEAT",
        0,
        "MODEL.HEADS.NUM_CLASSES",
        args.classes,
        "MODEL.HEADS.CLS_LAYER",
        "arcface",
        "MODEL.HEADS.POOL_LAYER",
        "gempool",
        "DATA_DIR",
        os.path.dirname(data_dir),
        "TRAIN.DATASET",
        os.path.basename(data_dir),
        "TRAIN.SPLIT",
        "train_list.txt",
        "TRAIN.BATCH_SIZE",
        args.batch,
        "TRAIN.IM_SIZE",
        args.im_size,
        "OPTIM.MAX_EPOCH",
        100,
        "DATA_LOADER.NUM_WORKERS",
        args.workers,
        "DATA_LOADER.PIN_MEMORY",
        False,
        "LOG_PERIOD",
        1000,
        "OUT_DIR",
        out_dir,
        "TRAIN.AUTO_RESUME",
        False,
    ]
    return load_cfg(None, [str(o) for o in opts] + list(args.opts))


def time_ours(cfg, epochs):
    trainer = Trainer(cfg, DistInfo())
    trainer.clock.start()  # the ETA's clock, as fit() starts it
    trainer.train_epoch(0)  # warm-up
    rates = []
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        trainer.train_epoch(e)
        rates.append(len(trainer.train_loader) * cfg.TRAIN.BATCH_SIZE / (time.perf_counter() - t))
    return rates


def time_bare(cfg, epochs):
    """The loop anyone would write by hand: same model, loader, batch; SGD; cross entropy."""
    torch.manual_seed(cfg.RNG_SEED)
    model = build_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.OPTIM.BASE_LR, momentum=0.9, weight_decay=5e-4)
    loader = build_train_loader(cfg)
    rates = []
    for e in range(epochs + 1):
        loader.sampler.set_epoch(e)
        loader.dataset.set_epoch(e)
        t, n = time.perf_counter(), 0
        for images, labels, *_ in loader:
            logits, _ = model(images, labels)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += images.shape[0]
        if e:
            rates.append(n / (time.perf_counter() - t))
    return rates


def time_pipeline(loader, epochs):
    rates = []
    for e in range(epochs + 1):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(e)
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += batch[0].shape[0]
        if e:
            rates.append(n / (time.perf_counter() - t))
    return rates


def torchvision_loader(cfg, items):
    """The same augmentation with PIL + torchvision.transforms."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(cfg.TRAIN.IM_SIZE, scale=tuple(cfg.TRAIN.CROP_SCALE)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(cfg.TRAIN.COLOR_JITTER, cfg.TRAIN.COLOR_JITTER, cfg.TRAIN.COLOR_JITTER),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    class PilDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            with Image.open(path) as im:
                return tf(im.convert("RGB")), label

    return torch.utils.data.DataLoader(
        PilDataset(),
        batch_size=cfg.TRAIN.BATCH_SIZE,
        shuffle=True,
        num_workers=cfg.DATA_LOADER.NUM_WORKERS,
        drop_last=True,
    )


def _timed_board(board, spent):
    """Wrap the board's logging methods so the seconds spent in them add up in ``spent[0]``."""

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t

        return wrapper

    for name in ("log_images", "log_iter", "log_epoch", "log_eval"):
        setattr(board, name, timed(getattr(board, name)))


def time_tensorboard(cfg, epochs, rounds, out_root, log_period):
    """Our trainer with TensorBoard on and off. Returns ``{on: [(wall img/s, cpu img/s)]}`` per
    timed epoch, ``{on: [wall img/s of each round]}`` and the fraction of the timed epochs'
    wall time spent inside the board's calls (TensorBoard on). Each measurement is a fresh
    trainer (its own OUT_DIR) with one warm-up epoch; on and off alternate their order between
    rounds so both see the same machine noise. The CPU rate (images per second of this process's
    CPU time) and the in-call fraction depend less on other processes' load than the wall rate."""
    epochs_out, rounds_out = {True: [], False: []}, {True: [], False: []}
    spent, wall_on = [0.0], 0.0
    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            c = cfg.clone()
            c.defrost()
            c.LOG.TENSORBOARD, c.LOG_PERIOD = on, log_period
            c.OUT_DIR = os.path.join(out_root, f"tb_{'on' if on else 'off'}_{r}")
            c.freeze()
            trainer = Trainer(c, DistInfo())
            trainer.clock.start()
            trainer.train_epoch(0)  # warm-up (the image grid is written here, once)
            images = len(trainer.train_loader) * c.TRAIN.BATCH_SIZE
            before, t_round = spent[0], time.perf_counter()
            if on:
                _timed_board(trainer.tb, spent)
            for e in range(1, epochs + 1):
                t, cpu = time.perf_counter(), time.process_time()
                trainer.train_epoch(e)
                epochs_out[on].append((images / (time.perf_counter() - t), images / (time.process_time() - cpu)))
            seconds = time.perf_counter() - t_round
            rounds_out[on].append(images * epochs / seconds)
            if on:
                wall_on += seconds
            else:
                spent[0] = before
            trainer.tb.close()
    return epochs_out, rounds_out, spent[0] / max(wall_on, 1e-9)


def report_tensorboard(result, log_period):
    epochs_out, rounds_out, in_calls = result
    wall = {on: statistics.median(r[0] for r in epochs_out[on]) for on in (True, False)}
    cpu = {on: statistics.median(r[1] for r in epochs_out[on]) for on in (True, False)}
    paired = statistics.median(a / b for a, b in zip(rounds_out[True], rounds_out[False]))
    print(f"{'':30}{'img/s wall':>11}{'img/s cpu':>11}  (medians of {len(epochs_out[True])} epochs)")
    for on in (True, False):
        print(f"{'trainer, TensorBoard ' + ('on' if on else 'off'):30}{wall[on]:11.1f}{cpu[on]:11.1f}")
    print(
        f"per-round wall ratio on/off (median of {len(rounds_out[True])} rounds): {paired:.3f}; "
        f"time inside TensorBoard calls: {100 * in_calls:.2f}% of the wall time"
    )
    print(
        f"log_period={log_period} tb_on_img_s={wall[True]:.1f} tb_off_img_s={wall[False]:.1f} "
        f"tensorboard_ratio={wall[True] / wall[False]:.3f} tensorboard_round_ratio={paired:.3f} "
        f"tensorboard_cpu_ratio={cpu[True] / cpu[False]:.3f} tensorboard_in_call_ratio={1 - in_calls:.4f}"
    )


def compile_cfgs(args, data_dir, out_dir):
    """``[(name, cfg)]``: the ResNet of the arguments and the tiny ViT of configs/metric/vit_tiny_cpu.yaml,
    both on the benchmark's data with its batch and loader settings."""
    resnet = make_cfg(args, data_dir, out_dir)
    vit_opts = [
        "MODEL.NUM_CLASSES",
        args.classes,
        "MODEL.HEADS.NUM_CLASSES",
        args.classes,
        "DATA_DIR",
        os.path.dirname(data_dir),
        "TRAIN.DATASET",
        os.path.basename(data_dir),
        "TRAIN.SPLIT",
        "train_list.txt",
        "TEST.DATASET",
        "",
        "TRAIN.BATCH_SIZE",
        args.batch,
        "OPTIM.MAX_EPOCH",
        100,
        "DATA_LOADER.NUM_WORKERS",
        args.workers,
        "LOG_PERIOD",
        1000,
        "OUT_DIR",
        out_dir,
        "TRAIN.AUTO_RESUME",
        False,
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vit = load_cfg(os.path.join(repo, "configs", "metric", "vit_tiny_cpu.yaml"), [str(o) for o in vit_opts])
    return [(f"resnet{args.depth}", resnet), ("vit_tiny", vit)]


def time_compile(cfg, epochs, rounds, out_root):
    """Images/s of our trainer eager and compiled (TRAIN.COMPILE): ``({False: [rates], True: [rates]},
    {False: [warm-up s], True: [warm-up s]})``, fresh trainers, order alternating between rounds."""
    rates, warmups = {False: [], True: []}, {False: [], True: []}
    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            c = cfg.clone()
            c.defrost()
            c.TRAIN.COMPILE = on
            c.OUT_DIR = os.path.join(out_root, f"compile_{'on' if on else 'off'}_{r}")
            c.freeze()
            trainer = Trainer(c, DistInfo())
            trainer.clock.start()
            t = time.perf_counter()
            trainer.train_epoch(0)  # warm-up: the compilation happens here
            warmups[on].append(time.perf_counter() - t)
            if on and trainer._compiled is not None and trainer._compiled.failed:
                raise SystemExit("torch.compile is not usable on this machine (see the warning above)")
            for e in range(1, epochs + 1):
                t = time.perf_counter()
                trainer.train_epoch(e)
                rates[on].append(len(trainer.train_loader) * c.TRAIN.BATCH_SIZE / (time.perf_counter() - t))
    return rates, warmups


def compare_compile(args, data_dir, out_root):
    print(
        f"{'':30}{'eager img/s':>12}{'compiled':>10}{'ratio':>8}{'compile_s':>10}  (median of "
        f"{args.rounds * args.epochs} epochs each)"
    )
    summary = []
    for name, cfg in compile_cfgs(args, data_dir, os.path.join(out_root, "unused")):
        rates, warmups = time_compile(cfg, args.epochs, args.rounds, os.path.join(out_root, name))
        eager, compiled = statistics.median(rates[False]), statistics.median(rates[True])
        extra = warmups[True][0] - statistics.median(warmups[False])  # the first compilation of this process
        print(f"{name + f' {cfg.TRAIN.IM_SIZE}px':30}{eager:12.1f}{compiled:10.1f}{compiled / eager:8.3f}{extra:10.1f}")
        summary.append(
            f"{name}_eager_img_s={eager:.1f} {name}_compiled_img_s={compiled:.1f} "
            f"{name}_compile_ratio={compiled / eager:.3f} {name}_compile_s={extra:.1f}"
        )
    print(" ".join(summary))


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "bench")
        if not args.data:
            make_demo_dataset(
                data,
                num_train_classes=args.classes,
                train_per_class=args.per_class,
                num_heldout_classes=2,
                queries_per_class=1,
                index_per_class=2,
                num_distractor_classes=1,
                image_size=max(160, args.im_size),
            )
        cfg = make_cfg(args, data, os.path.join(tmp, "out"))
        model = f"ResNet-{args.depth} width {args.width}" if cfg.MODEL.TYPE == "resnet" else cfg.MODEL.TYPE
        extra = " " + " ".join(args.opts) if args.opts else ""
        print(
            f"{model}{extra}, {args.im_size}px, batch {args.batch}, "
            f"{args.workers} workers, torch threads {torch.get_num_threads()}"
        )
        if args.compare_compile:
            compare_compile(args, data, os.path.join(tmp, "compile_runs"))
            return
        if args.compare_tensorboard:
            rates = time_tensorboard(cfg, args.epochs, args.rounds, os.path.join(tmp, "tb_runs"), args.log_period)
            report_tensorboard(rates, args.log_period)
            return
        ours, bare = [], []
        for _ in range(2):  # interleave to share the machine's noise
            bare += time_bare(cfg, args.epochs)
            ours += time_ours(cfg, args.epochs)
        ours_ips, bare_ips = statistics.median(ours), statistics.median(bare)
        items = train_items(cfg)
        cv2_rates = time_pipeline(build_train_loader(cfg, items=items), args.epochs)
        pil_rates = time_pipeline(torchvision_loader(cfg, items), args.epochs)
        cv2_rates += time_pipeline(build_train_loader(cfg, items=items), args.epochs)
        pil_rates += time_pipeline(torchvision_loader(cfg, items), args.epochs)
        cv2_ips, pil_ips = statistics.median(cv2_rates), statistics.median(pil_rates)
    print(f"{'':28}{'images/s':>10}")
    print(f"{'trainer (ours)':28}{ours_ips:10.1f}")
    print(f"{'bare PyTorch loop':28}{bare_ips:10.1f}")
    print(f"{'data: cv2 pipeline (ours)':28}{cv2_ips:10.1f}")
    print(f"{'data: torchvision + PIL':28}{pil_ips:10.1f}")
    print(
        f"ours_img_s={ours_ips:.1f} bare_img_s={bare_ips:.1f} trainer_ratio={ours_ips / bare_ips:.3f} "
        f"cv2_img_s={cv2_ips:.1f} pil_img_s={pil_ips:.1f} data_ratio={cv2_ips / pil_ips:.3f}"
    )


if __name__ == "__main__":
    main()
