"""Retrieval speed benchmark: exact search vs faiss vs the matrix-product floor.

    python benchmarks/search_bench.py [--queries 1000 --index 100000 --dim 512 --topk 100]

Times, on the same random L2-normalized data (CPU): our exact search
(``metric.retrieval.search.search``, the ``auto`` backend and each backend),
``faiss.IndexFlatIP`` used directly (search only, the index already built),
and a plain ``torch.mm`` of the same shapes (the compute floor, no top-k).
Each is run ``--repeat`` times, interleaved, and the best time is kept, which
damps noise from other processes. When ``metric.retrieval.metrics`` exposes
``glr_map_at_k`` it is timed on ``--map-queries`` synthetic queries.

It also times feature extraction against a bare forward of the same model and
batch. Other rows plug in through :func:`register`: a
function ``fn(args) -> (rows, summary)`` where ``rows`` is a list of
``(name, seconds, note)`` and ``summary`` a dict of ``key=value`` entries
(add its command-line options to :func:`make_parser`). The last line printed
is the ``key=value`` summary.
"""

import argparse
import os
import time

import numpy as np
import torch

EXTRA_BENCHMARKS = []


def register(fn):
    """Add ``fn(args) -> (rows, summary)`` to the benchmark; usable as a decorator."""
    EXTRA_BENCHMARKS.append(fn)
    return fn


def random_unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def best_times(fns, repeat):
    """Run the named callables ``repeat`` times, interleaved; return the best time of each."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_search(args):
    import faiss

    from metric.retrieval.search import CPU_AUTO_BACKEND, search

    rng = np.random.default_rng(0)
    xb = random_unit(rng, args.index, args.dim)
    xq = random_unit(rng, args.queries, args.dim)
    tq, tb = torch.from_numpy(xq), torch.from_numpy(xb)
    flat = faiss.IndexFlatIP(args.dim)
    start = time.perf_counter()
    flat.add(xb)
    add_s = time.perf_counter() - start

    ref_s, ref_i = flat.search(xq, args.topk)
    ours_s, ours_i = search(xq, xb, args.topk, backend="auto", device="cpu")
    agree = float(np.mean(ours_i == ref_i))

    other = "faiss" if CPU_AUTO_BACKEND == "torch" else "torch"
    fns = {
        f"ours (auto={CPU_AUTO_BACKEND})": lambda: search(xq, xb, args.topk, backend="auto", device="cpu"),
        f"ours ({other} backend)": lambda: search(xq, xb, args.topk, backend=other, device="cpu"),
        "faiss IndexFlatIP": lambda: flat.search(xq, args.topk),
        "torch.mm": lambda: torch.mm(tq, tb.t()),
    }
    t = best_times(fns, args.repeat)
    shape = f"{args.queries} x {args.index} x {args.dim}, top-{args.topk}"
    rows = [(name, sec, shape) for name, sec in t.items()]
    rows.append(("faiss index.add", add_s, "not counted above"))
    summary = {
        "ours_s": t[f"ours (auto={CPU_AUTO_BACKEND})"],
        "faiss_s": t["faiss IndexFlatIP"],
        "mm_s": t["torch.mm"],
        "ours_vs_faiss": t[f"ours (auto={CPU_AUTO_BACKEND})"] / t["faiss IndexFlatIP"],
        "ours_vs_mm": t[f"ours (auto={CPU_AUTO_BACKEND})"] / t["torch.mm"],
        "auto_backend": CPU_AUTO_BACKEND,
        "agree_with_faiss": agree,
    }
    return rows, summary


def bench_glr_map(args):
    """Time ``glr_map_at_k`` on synthetic GLR predictions."""
    from metric.retrieval.metrics import glr_map_at_k
    from metric.retrieval.metrics_glr import make_synthetic_glr

    predictions, solution = make_synthetic_glr(num_queries=args.map_queries, k=100, seed=0)
    start = time.perf_counter()
    glr_map_at_k(predictions, solution, 100)
    sec = time.perf_counter() - start
    return [("glr_map_at_k", sec, f"{args.map_queries} queries, top-100")], {"map_s": sec}


@register
def bench_extraction(args):
    """Images/s of our extraction (decode, resize, forward, normalize) vs a bare forward of the
    same model and batch on ready tensors (the compute floor)."""
    if args.skip_extract:
        return [], {}
    import tempfile

    from metric import build_model, load_cfg
    from metric.datasets.demo import make_demo_dataset
    from metric.engine.extract import list_images
    from metric.engine.predictor import Predictor, Preprocess

    size, batch = args.extract_size, args.extract_batch
    cfg = load_cfg(
        None,
        [
            "MODEL.DEPTH",
            str(args.extract_depth),
            "MODEL.HEADS.IN_FEAT",
            "0",
            "MODEL.HEADS.POOL_LAYER",
            "gempool",
            "MODEL.HEADS.NUM_CLASSES",
            "10",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_dataset(
            tmp + "/data",
            num_train_classes=2,
            train_per_class=2,
            num_heldout_classes=args.extract_images // 8,
            queries_per_class=1,
            index_per_class=8,
            num_distractor_classes=0,
            image_size=size,
        )
        paths = [p for _, p in list_images(tmp + "/data/index_list.txt")]
        predictor = Predictor(model, "cpu", Preprocess(size))
        loader = predictor.loader(paths, batch, args.extract_workers)
        x = torch.randn(batch, 3, size, size)
        n_batches = -(-len(paths) // batch)

        def ours():
            predictor.run(loader)

        @torch.no_grad()
        def bare():
            for _ in range(n_batches):
                model(x)

        times = best_times({"ours": ours, "bare": bare}, args.extract_repeat)
    n = len(paths)
    ours_ips, bare_ips = n / times["ours"], n_batches * batch / times["bare"]
    note = f"ResNet-{args.extract_depth}, {size}px, batch {batch}, {args.extract_workers} workers, {n} images"
    rows = [
        ("extract (ours)", times["ours"], f"{ours_ips:.1f} img/s; {note}"),
        ("bare forward", times["bare"], f"{bare_ips:.1f} img/s; same model and batch, ready tensors"),
    ]
    return rows, {"extract_img_s": ours_ips, "forward_img_s": bare_ips, "extract_vs_forward": ours_ips / bare_ips}


@register
def bench_rerank(args):
    """Re-ranking of ``--queries`` queries in ``--index`` random unit vectors (default 1,000 x
    100,000 x 512): αQE and DBA (K=2), SuperGlobal (M=400, K=9) after a top-400 search, and
    k-reciprocal (k1=20, k2=6): its index k-NN graph (built once per index, can be saved) and the
    re-ranking given the graph. Each is timed once (``--rerank-repeat``), beside the plain top-k
    search of the same run (``search_s``) so that ratios survive a busy machine."""
    if args.skip_rerank:
        return [], {}
    from metric.retrieval.knn_graph import build_index_graph
    from metric.retrieval.kreciprocal import k_reciprocal_rerank
    from metric.retrieval.rerank import database_augmentation, query_expansion
    from metric.retrieval.search import search
    from metric.retrieval.superglobal import superglobal_rerank

    rng = np.random.default_rng(1)
    xb = random_unit(rng, args.index, args.dim)
    xq = random_unit(rng, args.queries, args.dim)
    k = args.topk
    found = {}

    def run_search():
        found["s"] = search(xq, xb, k, device="cpu")

    def qe():
        s, i = search(xq, xb, max(k, 2), device="cpu")
        search(query_expansion(xq, xb, s, i, 2), xb, k, device="cpu")

    def dba():
        search(xq, database_augmentation(xb, 2, device="cpu"), k, device="cpu")

    def sg():
        s, i = search(xq, xb, max(k, 400), device="cpu")
        superglobal_rerank(xq, xb, s, i, device="cpu")

    def graph():
        found["graph"] = build_index_graph(xb, 21, device="cpu")

    def kr():
        k_reciprocal_rerank(xq, xb, k, graph=found["graph"], device="cpu")

    steps = {"search": run_search, "qe": qe, "superglobal": sg, "kr_graph": graph, "kreciprocal": kr}
    if not args.rerank_skip_dba:
        steps["dba"] = dba
    t = {}
    for name, fn in steps.items():  # the graph is built before k-reciprocal needs it
        t[name] = best_times({name: fn}, args.rerank_repeat)[name]
    shape = f"{args.queries} x {args.index} x {args.dim}, top-{k}"
    notes = {
        "search": "plain exact search, same data (reference for the ratios)",
        "qe": "alpha-QE K=2: search, expand, second search",
        "dba": "DBA K=2: index x index top-3 search, augment, search",
        "superglobal": "top-400 search + SuperGlobal M=400 K=9 beta=0.15",
        "kr_graph": "k-NN graph of the index, width 21 + farthest item (once per index)",
        "kreciprocal": "k-reciprocal k1=20 k2=6 lambda=0.3, graph given",
    }
    rows = [(f"rerank: {name}", sec, f"{notes[name]}; {shape}") for name, sec in t.items()]
    summary = {f"rerank_{name}_s": sec for name, sec in t.items()}
    summary.update({f"rerank_{name}_vs_search": sec / t["search"] for name, sec in t.items() if name != "search"})
    return rows, summary


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--skip-rerank", action="store_true", help="do not time re-ranking")
    parser.add_argument("--rerank-skip-dba", action="store_true", help="do not time DBA (an index x index search)")
    parser.add_argument("--rerank-repeat", type=int, default=1, help="runs of each re-ranking timing (best kept)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--index", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each timing (best kept)")
    parser.add_argument("--map-queries", type=int, default=100_000)
    parser.add_argument("--skip-map", action="store_true", help="do not time glr_map_at_k")
    parser.add_argument("--skip-extract", action="store_true", help="do not time feature extraction")
    parser.add_argument("--extract-depth", type=int, default=18, help="ResNet depth for the extraction rows")
    parser.add_argument("--extract-size", type=int, default=224)
    parser.add_argument("--extract-batch", type=int, default=32)
    parser.add_argument("--extract-workers", type=int, default=2)
    parser.add_argument("--extract-images", type=int, default=256)
    parser.add_argument("--extract-repeat", type=int, default=2)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)

    rows, summary = bench_search(args)
    benches = list(EXTRA_BENCHMARKS) + ([] if args.skip_map else [bench_glr_map])
    for fn in benches:
        more_rows, more_summary = fn(args)
        rows += more_rows
        summary.update(more_summary)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads: torch {torch.get_num_threads()}, load average {load:.1f} on {os.cpu_count()} cpus")
    print(f"{'what':<26} {'seconds':>9}  notes")
    for name, sec, note in rows:
        print(f"{name:<26} {sec:>9.3f}  {note}")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
