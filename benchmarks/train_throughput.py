"""Training throughput: our trainer vs a bare hand-written PyTorch loop, and our cv2 data
pipeline vs an equivalent torchvision/PIL pipeline, measured in one run on the same data.

    python benchmarks/train_throughput.py [--depth 18] [--im-size 128] [--batch 32] [--epochs 2] [KEY VALUE ...]

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
from metric.utils.distributed import DistInfo
from metric.engine.trainer import Trainer
from metric.datasets.demo import make_demo_dataset
from metric.datasets.loader import build_train_loader, train_items
from metric.modeling import build_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--width", type=int, default=32, help="RESNET.WIDTH_PER_GROUP and STEM_WIDTH")
    p.add_argument("--im-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--per-class", type=int, default=24)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per method (after one warm-up)")
    p.add_argument("--data", default=None, help="data folder (default: a temporary demo set)")
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE applied last, e.g. another model: "
                   "MODEL.TYPE vit MODEL.WIDTH 128 MODEL.LAYERS 2 MODEL.PATCH_SIZE 8 MODEL.EMB_DIM 64 "
                   "MODEL.HEADS.POOL_LAYER identity")
    return p.parse_args()


def make_cfg(args, data_dir, out_dir):
    opts = [
        "MODEL.DEPTH", args.depth, "RESNET.WIDTH_PER_GROUP", args.width, "RESNET.STEM_WIDTH", args.width,
        "MODEL.HEADS.IN_FEAT", 0, "MODEL.HEADS.NUM_CLASSES", args.classes, "MODEL.HEADS.CLS_LAYER", "arcface",
        "MODEL.HEADS.POOL_LAYER", "gempool", "DATA_DIR", os.path.dirname(data_dir),
        "TRAIN.DATASET", os.path.basename(data_dir), "TRAIN.SPLIT", "train_list.txt",
        "TRAIN.BATCH_SIZE", args.batch, "TRAIN.IM_SIZE", args.im_size, "OPTIM.MAX_EPOCH", 100,
        "DATA_LOADER.NUM_WORKERS", args.workers, "DATA_LOADER.PIN_MEMORY", False, "LOG_PERIOD", 1000,
        "OUT_DIR", out_dir, "TRAIN.AUTO_RESUME", False,
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
        rates.append(trainer.iters_per_epoch * cfg.TRAIN.BATCH_SIZE / (time.perf_counter() - t))
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

    tf = T.Compose([
        T.RandomResizedCrop(cfg.TRAIN.IM_SIZE, scale=tuple(cfg.TRAIN.CROP_SCALE)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(cfg.TRAIN.COLOR_JITTER, cfg.TRAIN.COLOR_JITTER, cfg.TRAIN.COLOR_JITTER),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])

    class PilDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            with Image.open(path) as im:
                return tf(im.convert("RGB")), label

    return torch.utils.data.DataLoader(
        PilDataset(), batch_size=cfg.TRAIN.BATCH_SIZE, shuffle=True, num_workers=cfg.DATA_LOADER.NUM_WORKERS,
        drop_last=True,
    )


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "bench")
        if not args.data:
            make_demo_dataset(data, num_train_classes=args.classes, train_per_class=args.per_class,
                              num_heldout_classes=2, queries_per_class=1, index_per_class=2,
                              num_distractor_classes=1, image_size=max(160, args.im_size))
        cfg = make_cfg(args, data, os.path.join(tmp, "out"))
        model = f"ResNet-{args.depth} width {args.width}" if cfg.MODEL.TYPE == "resnet" else cfg.MODEL.TYPE
        extra = " " + " ".join(args.opts) if args.opts else ""
        print(f"{model}{extra}, {args.im_size}px, batch {args.batch}, "
              f"{args.workers} workers, torch threads {torch.get_num_threads()}")
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
    print(f"ours_img_s={ours_ips:.1f} bare_img_s={bare_ips:.1f} trainer_ratio={ours_ips / bare_ips:.3f} "
          f"cv2_img_s={cv2_ips:.1f} pil_img_s={pil_ips:.1f} data_ratio={cv2_ips / pil_ips:.3f}")


if __name__ == "__main__":
    main()
