"""GLDv2-scale rehearsal (issue 11): list parsing, exact / float16 / approximate search, classifier.

    python benchmarks/scale_bench.py [--part list|search|classifier|all] [--list-n 4130000]
                                     [--n 1000000 --queries 1000 --dim 512 --topk 100] ...

Parts (``--part``, default ``all``; several may be given, comma-separated):

- ``list``: parse time of a synthetic GLDv2-sized list file (``--list-n`` lines, 203,094
  classes; the images need not exist) as the old Python list of ``(path, label)`` tuples and
  as the compact :class:`metric.datasets.items.ItemList`, and the resident memory (RSS, from
  ``/proc/<pid>/status``) of the main process and of ``--workers`` DataLoader workers after a
  full pass over a data set that does not decode (it returns the label and the path length).
- ``search``: stores of ``--n`` x ``--dim`` unit vectors scattered around ``n / 100`` random
  centres (near neighbours, as in retrieval data), float32 and float16, written with
  ``save_features`` from a memory-mapped array (time, peak anonymous memory), loaded and
  verified; exact top-k of ``--queries`` queries in each (:func:`metric.retrieval.search.search`,
  ``--backend``) against ``faiss.IndexFlatIP`` on the same float32 data in memory; the recall@k
  agreement of float16 vs float32 search; an IVF-PQ index built on the float32 store with
  :func:`metric.retrieval.ann.build_ann_index` (``--nlist``, ``--nprobe``, ``--ivf-train``; build
  time, search time, recall@k against the exact search; ``--skip-ivfpq``, ``--only-ivfpq``).
  On a CPU that the OpenBLAS bundled with faiss does not know, set ``OPENBLAS_CORETYPE`` (see
  docs/RETRIEVAL.md).
- ``classifier``: per-process peak memory (VmHWM), classifier state (weights, gradient, momentum)
  and step time of an ArcFace classifier alone at ``--classes`` x ``--cls-dim`` in ``--cls-procs``
  gloo processes (``--cls-batch`` random embeddings each per step, SGD with momentum and weight
  decay): the replicated head (every process holds all classes and all-reduces the gradient, as
  DDP does) vs Partial FC at sample rate 1.0 and 0.1 (``--cls-modes``), and their ratios. The
  replicated head needs about 30 x classes x dim bytes per process (measured): check free memory first.

Every part prints its rows; the last line is the ``key=value`` summary of all parts that ran.
Figures depend on the machine and its load: read ratios measured in the same run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

PARTS = {}  # name -> list of fn(args) -> (rows, summary)


def register(part):
    """Add ``fn(args) -> (rows, summary)`` to ``part``; ``rows`` is a list of ``(name, value, note)``,
    ``summary`` a dict of ``key=value`` entries. Use as a decorator: ``@register("classifier")``."""

    def add(fn):
        PARTS.setdefault(part, []).append(fn)
        return fn

    return add


def rss_mib(pid="self"):
    """Resident set size of a process in MiB (``VmRSS`` of ``/proc/<pid>/status``; Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--part", default="all", help="list, search, classifier or all (comma-separated)")
    p.add_argument("--tmp", default=None, help="folder for the temporary list file and stores (default: system temp)")
    # list
    p.add_argument("--list-n", type=int, default=4_130_000, help="lines of the synthetic list")
    p.add_argument("--list-classes", type=int, default=203_094, help="classes of the synthetic list")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers for the RSS measurement")
    p.add_argument("--list-batch", type=int, default=1024, help="batch size of the pass over the list")
    p.add_argument("--skip-old", action="store_true", help="measure only the compact representation")
    p.add_argument("--list-child", choices=("old", "new"), help=argparse.SUPPRESS)
    p.add_argument("--list-file", help=argparse.SUPPRESS)
    # search
    p.add_argument("--n", type=int, default=1_000_000, help="index vectors of the search part")
    p.add_argument("--queries", type=int, default=1000, help="queries of the search part")
    p.add_argument("--dim", type=int, default=512, help="dimension of the search part")
    p.add_argument("--topk", type=int, default=100, help="k of top-k and recall@k")
    p.add_argument("--backend", default="auto", help="backend of our exact search (auto, faiss, torch)")
    p.add_argument("--skip-ivfpq", action="store_true", help="no IVF-PQ build")
    p.add_argument("--nlist", type=int, default=None, help="IVF-PQ lists (default: the builder's, ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF-PQ nprobe (default: the builder's)")
    p.add_argument("--ivf-train", type=int, default=None, help="IVF-PQ training vectors (default: the builder's)")
    p.add_argument("--only-ivfpq", action="store_true", help="search part: the IVF-PQ rows only")
    for fn in _EXTRA_OPTIONS:
        fn(p)
    return p


_EXTRA_OPTIONS = []


def add_options(fn):
    """Register ``fn(parser)`` adding a part's command-line options (use as a decorator)."""
    _EXTRA_OPTIONS.append(fn)
    return fn


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.list_child:
        return _list_child(args)
    wanted = list(PARTS) if args.part == "all" else [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        sys.stderr.write(f"error: unknown --part {', '.join(unknown)}; choose from {', '.join(PARTS)} or all\n")
        return 2
    summary = {}
    for part in wanted:
        for fn in PARTS[part]:
            rows, values = fn(args)
            for name, value, note in rows:
                print(f"{part:10s} {name:40s} {_fmt(value):>12s}  {note}", flush=True)
            summary.update(values)
    print(" ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return 0


# ----------------------------------------------------------------------------- part: list


def write_synthetic_list(path, n, classes, seed=0):
    """A GLDv2-like list: ``train/a/b/c/<16 hex>.jpg label`` lines, every class used."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(min(n, classes)), rng.integers(0, classes, max(0, n - classes))])
    rng.shuffle(labels)
    with open(path, "w") as f:
        step = 200_000
        for start in range(0, n, step):
            ids = rng.integers(0, 2**63, size=min(step, n - start), dtype=np.int64)
            f.write(
                "".join(
                    f"train/{h[0]}/{h[1]}/{h[2]}/{h}.jpg {lab}\n"
                    for h, lab in zip((f"{i:016x}" for i in ids.tolist()), labels[start : start + step].tolist())
                )
            )
    return path


def old_read_list(list_path, root, num_classes):
    """The previous representation: ``read_list`` as it was before ItemList (a list of tuples)."""
    items = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{list_path}:{lineno}: expected 'relative/path.jpg label'")
            label = int(parts[1])
            if label < 0 or label >= num_classes:
                raise ValueError(f"{list_path}:{lineno}: label {label} outside [0, {num_classes})")
            items.append((os.path.join(root, parts[0]), label))
    return items


def private_mib(pid):
    """Private (unshared) resident memory of a process in MiB (``/proc/<pid>/smaps_rollup``): what
    a forked worker has copied, where its RSS also counts the pages it still shares."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024.0


def _children(pid):
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _list_child(args):
    """One measurement in a fresh interpreter: parse (old or new), then a full shuffled pass over
    a data set that does not decode, with ``--workers`` persistent workers; prints one JSON line."""
    import json

    import torch
    from torch.utils.data import DataLoader, Dataset

    from metric.datasets.listfile import read_list  # imported by both, before the baseline

    kind, list_path = args.list_child, args.list_file
    base = rss_mib()
    start = time.perf_counter()
    if kind == "old":
        items = old_read_list(list_path, os.path.dirname(list_path), args.list_classes)
    else:
        items = read_list(list_path, None, args.list_classes, check_files=False)
    parse_s = time.perf_counter() - start
    after_parse = rss_mib()

    class NoDecode(Dataset):  # the item lookup of ListDataset, without decoding an image
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            return label, len(path)

    loader = DataLoader(
        NoDecode(),
        batch_size=args.list_batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    start = time.perf_counter()
    seen = 0
    for labels, _ in loader:
        seen += len(labels)
    pass_s = time.perf_counter() - start
    workers = _children(os.getpid()) if args.workers else []
    out = {
        "parse_s": parse_s,
        "pass_s": pass_s,
        "items": len(items),
        "seen": seen,
        "main_base_mib": base,
        "main_items_mib": after_parse - base,
        "main_mib": rss_mib(),
        "worker_rss_mib": [rss_mib(w) for w in workers],
        "worker_private_mib": [private_mib(w) for w in workers],
    }
    print(json.dumps(out), flush=True)


@register("list")
def bench_list(args):
    """Parse time and memory of a GLDv2-full-sized list, old (list of tuples) vs new (ItemList)."""
    import json

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        list_path = os.path.join(tmp, "train_list.txt")
        start = time.perf_counter()
        write_synthetic_list(list_path, args.list_n, args.list_classes)
        made_s = time.perf_counter() - start
        size_mib = os.path.getsize(list_path) / 2**20
        results = {}
        for kind in (["old"] if not args.skip_old else []) + ["new"]:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--list-child",
                kind,
                "--list-file",
                list_path,
                "--list-classes",
                str(args.list_classes),
                "--workers",
                str(args.workers),
                "--list-batch",
                str(args.list_batch),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[kind] = json.loads(out.strip().splitlines()[-1])
    rows = [
        ("synthetic list", size_mib, f"MiB; {args.list_n} lines, {args.list_classes} classes, written in {made_s:.1f}s")
    ]
    summary = {"list_lines": args.list_n, "list_workers": args.workers}
    for kind, r in results.items():
        w_rss, w_priv = r["worker_rss_mib"], r["worker_private_mib"]
        name = "list of tuples" if kind == "old" else "ItemList"
        rows += [
            (f"{name}: parse", r["parse_s"], "s"),
            (f"{name}: main process items", r["main_items_mib"], "MiB RSS added by the parse"),
            (
                f"{name}: main process RSS",
                r["main_mib"],
                f"MiB after the pass (interpreter+torch {r['main_base_mib']:.0f})",
            ),
            (
                f"{name}: pass over the items",
                r["pass_s"],
                f"s; {len(w_rss)} workers, batch {args.list_batch}, shuffled",
            ),
        ]
        if w_rss:
            rows += [
                (f"{name}: worker RSS (mean)", float(np.mean(w_rss)), f"MiB; max {max(w_rss):.0f}"),
                (
                    f"{name}: worker private (mean)",
                    float(np.mean(w_priv)),
                    f"MiB copied per worker; sum over workers {sum(w_priv):.0f}",
                ),
            ]
        summary.update(
            {
                f"{kind}_parse_s": r["parse_s"],
                f"{kind}_items_mib": r["main_items_mib"],
                f"{kind}_main_rss_mib": r["main_mib"],
                f"{kind}_worker_rss_mib": float(np.mean(w_rss)) if w_rss else 0.0,
                f"{kind}_worker_private_mib": float(np.mean(w_priv)) if w_priv else 0.0,
            }
        )
    if "old" in results:
        old, new = results["old"], results["new"]
        summary["parse_speedup"] = old["parse_s"] / new["parse_s"]
        summary["items_mem_ratio"] = old["main_items_mib"] / max(new["main_items_mib"], 1e-3)
        if old["worker_private_mib"]:
            summary["worker_private_ratio"] = float(np.mean(old["worker_private_mib"])) / max(
                float(np.mean(new["worker_private_mib"])), 1e-3
            )
    return rows, summary


# ----------------------------------------------------------------------------- part: search


def clustered_unit(rng, n, dim, out, centroids, spread=0.8, block=65536):
    """Fill ``out`` [n, dim] (an array or memmap) with unit vectors scattered around ``centroids``
    (about 100 per cluster), in blocks: data with near neighbours, as retrieval data has."""
    for start in range(0, n, block):
        stop = min(n, start + block)
        assign = rng.integers(0, len(centroids), stop - start)
        x = centroids[assign] + spread * rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out


def recall_agreement(found, reference, k):
    """Mean over queries of |found top-k ∩ reference top-k| / k."""
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) for a, b in zip(found, reference)]) / k)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def anon_mib(pid="self"):
    """Anonymous resident memory in MiB (``RssAnon``: heap and arrays, not the pages of
    memory-mapped files, which the kernel can drop at any time)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakAnon:
    """The peak of :func:`anon_mib` while the ``with`` block runs (sampled every 20 ms)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anon_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mib())


def _bench_ivfpq(args, store_path, store, xq, exact, tmp, summary=None):
    """IVF-PQ on the float32 store: build time, search time, recall@k against ``exact``."""
    from metric.retrieval.ann import AnnOptions, ann_search, build_ann_index, load_ann_index

    k = args.topk
    options = AnnOptions(
        "ivfpq",
        nlist=args.nlist,
        nprobe=args.nprobe,
        train_size=args.ivf_train,
        sample=min(100, len(store)),
        recall_k=k,
    )
    _, tb = _timed(lambda: build_ann_index(store_path, options, out_dir=tmp))
    index, params = load_ann_index(store, "ivfpq", tmp)
    (_, found), ta = _timed(lambda: ann_search(index, params, xq, k))
    recall = recall_agreement(found, exact, k)
    note = f"nlist {params['nlist']}, PQ{params['m']}x{params['nbits']}, trained on {params['train_size']}"
    if summary is not None:
        summary.update(
            ivfpq_build_s=tb,
            ivfpq_search_s=ta,
            ivfpq_recall=recall,
            ivfpq_nlist=params["nlist"],
            ivfpq_nprobe=params["nprobe"],
            ivfpq_train=params["train_size"],
        )
    return [
        ("IVF-PQ build", tb, f"s; {note} (incl. its 100-query recall check)"),
        ("IVF-PQ search", ta, f"s; nprobe {params['nprobe']}"),
        ("IVF-PQ recall@k vs exact", recall, f"{len(xq)} queries"),
    ]


@register("search")
def bench_search(args):
    """Stores of ``--n`` x ``--dim`` (float32 and float16) written from a memmap in blocks, exact
    search of ``--queries`` queries in each, faiss IndexFlatIP on the same float32 data, IVF-PQ."""
    import faiss

    from metric.retrieval.search import CPU_AUTO_BACKEND, search
    from metric.retrieval.store import load_features, save_features

    n, d, k, nq = args.n, args.dim, args.topk, args.queries
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((max(1, n // 100), d), dtype=np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    rows, summary = [], {"search_n": n, "search_dim": d, "search_queries": nq, "topk": k}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        raw = np.lib.format.open_memmap(os.path.join(tmp, "raw.npy"), mode="w+", dtype=np.float32, shape=(n, d))
        clustered_unit(rng, n, d, raw, centroids)
        raw.flush()
        xq = clustered_unit(rng, nq, d, np.empty((nq, d), np.float32), centroids)
        ids = [f"{i:08d}" for i in range(n)]
        anon0 = anon_mib()
        with PeakAnon() as peak32:
            p32, w32 = _timed(lambda: save_features(os.path.join(tmp, "s32"), raw, ids, normalize=False))
        raw = None  # the store holds the rows now
        os.remove(os.path.join(tmp, "raw.npy"))
        s32, l32 = _timed(lambda: load_features(p32))  # memory-mapped; verified (digest, finite, norms) in blocks
        backend = args.backend
        (sc32, i32), t32 = _timed(lambda: search(xq, s32, k, backend=backend, device="cpu"))
        if args.only_ivfpq:
            rows.append((f"exact search, float32 store ({backend})", t32, f"s; {nq} x {n} x {d}, top-{k}"))
            summary["exact_f32_s"] = t32
            return rows + _bench_ivfpq(args, p32, s32, xq, i32, tmp, summary), summary
        with PeakAnon() as peak16:
            p16, w16 = _timed(
                lambda: save_features(os.path.join(tmp, "s16"), s32.embeddings, ids, normalize=False, dtype="float16")
            )
        peak = max(peak32.peak, peak16.peak) - anon0
        s16, l16 = _timed(lambda: load_features(p16))
        mib = lambda p: os.path.getsize(os.path.join(p, "embeddings.npy")) / 2**20  # noqa: E731
        rows += [
            ("write float32 store", w32, f"s; {mib(p32):.0f} MiB, from a memmap in blocks"),
            ("write float16 store", w16, f"s; {mib(p16):.0f} MiB"),
            (
                "peak anonymous memory added while writing",
                peak,
                f"MiB (the data is {n * d * 4 / 2**20:.0f} MiB; mapped file pages not counted)",
            ),
            ("load+verify float32 store", l32, "s (memory-mapped, digest/finite/norms in blocks)"),
            ("load+verify float16 store", l16, "s"),
        ]
        (sc16, i16), t16 = _timed(lambda: search(xq, s16, k, backend=backend, device="cpu"))
        agree16 = recall_agreement(i16, i32, k)
        top1 = float(np.mean(i16[:, 0] == i32[:, 0]))
        rows += [
            (
                f"exact search, float32 store ({backend if backend != 'auto' else CPU_AUTO_BACKEND})",
                t32,
                f"s; {nq} x {n} x {d}, top-{k}",
            ),
            ("exact search, float16 store", t16, "s; converted to float32 block by block"),
            (
                "float16 vs float32 recall@k",
                agree16,
                f"top-1 same: {top1:.4f}; max |score diff| {float(np.abs(sc16 - sc32).max()):.2e}",
            ),
        ]
        flat = faiss.IndexFlatIP(d)
        _, add_s = _timed(
            lambda: [flat.add(np.ascontiguousarray(s32.embeddings[i : i + 262144])) for i in range(0, n, 262144)]
        )
        (fs, fi), tf = _timed(lambda: flat.search(xq, k))
        agree_faiss = recall_agreement(i32, fi, k)
        flat = None
        rows += [
            ("faiss IndexFlatIP search", tf, f"s; same float32 data in memory (add: {add_s:.1f}s, not counted)"),
            ("ours float32 vs faiss recall@k", agree_faiss, ""),
        ]
        summary.update(
            write_f32_s=w32,
            write_f16_s=w16,
            write_peak_anon_mib=peak,
            load_verify_f32_s=l32,
            load_verify_f16_s=l16,
            exact_f32_s=t32,
            exact_f16_s=t16,
            faiss_flat_s=tf,
            f16_vs_f32_ratio=t16 / t32,
            ours_vs_faiss=t32 / tf,
            f16_recall_agreement=agree16,
            f16_top1_same=top1,
            ours_vs_faiss_agreement=agree_faiss,
        )
        if not args.skip_ivfpq:
            rows += _bench_ivfpq(args, p32, s32, xq, i32, tmp, summary)
    return rows, summary


# ----------------------------------------------------------------------------- part: classifier
# The margin classifier alone (ArcFace, SGD with momentum and weight decay) at --classes x
# --cls-dim in --cls-procs gloo processes on the CPU, each with --cls-batch random embeddings per
# step: "full" = every process holds the whole classifier and its optimizer state and all-reduces
# its gradient (what DistributedDataParallel does with the non-parallel head); "pfc<r>" = Partial
# FC at SAMPLE_RATE r (metric.modeling.layers.partial_fc). Each mode runs in fresh processes, so
# their peak resident memory (VmHWM) is theirs alone.

CLASSIFIER_MODES = {"full": None, "pfc1": 1.0, "pfc0.1": 0.1}


@add_options
def _classifier_options(p):
    p.add_argument("--classes", type=int, default=1_000_000, help="classes of the classifier part")
    p.add_argument("--cls-dim", type=int, default=512, help="embedding dimension of the classifier part")
    p.add_argument("--cls-batch", type=int, default=64, help="embeddings per process per step (classifier part)")
    p.add_argument("--cls-steps", type=int, default=5, help="timed steps per mode (after one untimed)")
    p.add_argument("--cls-procs", type=int, default=2, help="gloo processes of the classifier part")
    p.add_argument(
        "--cls-modes",
        default="full,pfc1,pfc0.1",
        help="comma-separated: full (replicated head), pfc1 (Partial FC, rate 1.0), pfc0.1 (rate 0.1)",
    )


def _status_mib(key, pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _tensor_mib(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def _classifier_worker(rank, world, port, args, mode, out_dir):
    import json

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    from metric.engine import classifier_shards as engine_pfc
    from metric.modeling.layers.margins import ArcFace
    from metric.modeling.layers.partial_fc import PartialFC, shard_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = _status_mib("VmRSS")
    rate = CLASSIFIER_MODES[mode]
    c, d, n = args.classes, args.cls_dim, args.cls_batch
    torch.manual_seed(0)
    if rate is None:
        layer = ArcFace(d, c, scale=30.0, margin=0.3).train()
        pfc = None
    else:
        layer = ArcFace(d, c, scale=30.0, margin=0.3, shard=shard_of(c, world, rank), init_seed=0).train()
        pfc = PartialFC(rate).train()
    holder = nn.Module()
    holder.head = nn.Module()
    holder.head.classifier, holder.head.partial_fc = layer, pfc
    opt = torch.optim.SGD([layer.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    times = []
    for step in range(args.cls_steps + 1):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        emb = torch.randn(n, d, generator=g).requires_grad_()
        labels = torch.randint(0, c, (n,), generator=g)
        dist.barrier()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if pfc is None:
            loss = F.cross_entropy(layer(emb, labels), labels)
            loss.backward()
            dist.all_reduce(layer.weight.grad)  # DDP's gradient all-reduce (then the mean)
            layer.weight.grad.div_(world)
            opt.step()
        else:
            pfc.set_step(step)
            loss = pfc(layer, emb, labels)
            loss.backward()
            with engine_pfc.sampled_rows(opt, holder):
                opt.step()
        dist.barrier()
        if step:
            times.append(time.perf_counter() - t)
    state = list(opt.state[layer.weight].values()) if layer.weight in opt.state else []
    result = {
        "rank": rank,
        "rows": layer.weight.shape[0],
        "base_rss_mib": base,
        "peak_rss_mib": _status_mib("VmHWM"),
        "state_mib": _tensor_mib([layer.weight, layer.weight.grad] + [v for v in state if torch.is_tensor(v)]),
        "step_s": sorted(times)[len(times) // 2],
        "loss": float(loss.detach()),
    }
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{mode}_rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@register("classifier")
def bench_classifier(args):
    import json

    import torch.multiprocessing as mp

    modes = [m.strip() for m in args.cls_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in CLASSIFIER_MODES]
    if bad:
        raise SystemExit(f"error: unknown --cls-modes {', '.join(bad)}; choose from {', '.join(CLASSIFIER_MODES)}")
    world = args.cls_procs
    rows, summary, got = (
        [],
        {
            "cls_classes": args.classes,
            "cls_dim": args.cls_dim,
            "cls_procs": world,
            "cls_batch_per_proc": args.cls_batch,
        },
        {},
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for mode in modes:
            mp.start_processes(
                _classifier_worker, args=(world, _free_port(), args, mode, tmp), nprocs=world, start_method="spawn"
            )
            per = [json.load(open(os.path.join(tmp, f"{mode}_rank{r}.json"))) for r in range(world)]
            got[mode] = {
                "peak": max(p["peak_rss_mib"] for p in per),
                "base": max(p["base_rss_mib"] for p in per),
                "state": max(p["state_mib"] for p in per),
                "step": max(p["step_s"] for p in per),
                "rows": max(p["rows"] for p in per),
            }
            g = got[mode]
            note = f"{g['rows']} rows per process, global batch {args.cls_batch * world}"
            before = f"{note}; {g['base']:.0f} MiB before the classifier"
            rows += [
                (f"{mode} peak RSS per process (MiB)", g["peak"], before),
                (f"{mode} classifier+grad+momentum (MiB)", g["state"], "per process"),
                (f"{mode} step time (s)", g["step"], f"median of {args.cls_steps}, slowest process"),
            ]
            key = mode.replace(".", "")
            summary.update(
                {f"{key}_peak_rss_mib": g["peak"], f"{key}_state_mib": g["state"], f"{key}_step_s": g["step"]}
            )
    if "full" in got:
        for mode in modes:
            if mode == "full":
                continue
            key = mode.replace(".", "")
            mem = got["full"]["peak"] / got[mode]["peak"]
            state = got["full"]["state"] / got[mode]["state"]
            speed = got["full"]["step"] / got[mode]["step"]
            rows += [
                (f"full / {mode} peak RSS", mem, "per process"),
                (f"full / {mode} classifier state", state, ""),
                (f"full / {mode} step time", speed, "> 1: Partial FC is faster"),
            ]
            summary.update(
                {f"full_over_{key}_rss": mem, f"full_over_{key}_state": state, f"full_over_{key}_step": speed}
            )
    return rows, summary


if __name__ == "__main__":
    sys.exit(main())
