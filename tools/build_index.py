#!/usr/bin/env python3
"""Train and save an approximate (faiss IVF-PQ or HNSW) index of a feature store; report recall@100.

python tools/build_index.py --index IDIR --type ivfpq [--nlist N --m M --nbits B --nprobe P]
python tools/build_index.py --index IDIR --type hnsw [--hnsw-m M --ef-construction E --ef-search S]
python tools/build_index.py --index IDIR --type knn [--knn K] [--device cuda]   (exact k-NN graph for
    k-reciprocal re-ranking: tools/search.py --rerank kreciprocal with --kr-k1 <= K uses it)

Sharded IVF, for a search by W processes (torchrun ... tools/search.py --ann): the quantizer is
trained once on a sample of all rows, then one index per shard is filled in chunks:
python tools/build_index.py --index IDIR --shards W [--type ivfpq|ivfflat] [--output-dir D]
python tools/build_index.py --index OUT.shards [--type ...]   (the shard stores of sharded extraction: one index each)
python tools/build_index.py ... --train-only; then, anywhere: ... --shard-rank R [--quantizer FILE]
"""

from metric.retrieval.ann import ANN_TYPES, AnnOptions, build_ann_index
from metric.retrieval.ann_sharded import SHARDED_TYPES, ShardedIvfOptions, build_sharded_index
from metric.retrieval.knn_graph import build_store_graph
from metric.retrieval.sharded import index_store_paths, open_index
from metric.utils.cli import add_verify_option, exit_tool, make_parser, run_tool
from metric.utils.errors import MetricError


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument(
        "--index", required=True, help="index feature store folder (sharded IVF: or a folder of shard stores)"
    )
    parser.add_argument(
        "--type",
        default="ivfpq",
        choices=tuple(dict.fromkeys(ANN_TYPES + SHARDED_TYPES)) + ("knn",),
        help="index type (default ivfpq; ivfflat: sharded only; knn: the exact k-NN graph for k-reciprocal re-ranking)",
    )
    parser.add_argument(
        "--shards", type=int, default=None, metavar="W", help="sharded IVF: one index per slice of W (torchrun ranks)"
    )
    parser.add_argument(
        "--shard-rank", type=int, nargs="+", default=None, metavar="R", help="sharded IVF: build only shard(s) R"
    )
    parser.add_argument("--train-only", action="store_true", help="sharded IVF: train and save the quantizer only")
    parser.add_argument(
        "--quantizer", default=None, metavar="FILE", help="sharded IVF: a trained quantizer (faiss_TYPE.trained) to use"
    )
    parser.add_argument(
        "--knn",
        type=int,
        default=20,
        metavar="K",
        help="knn: neighbours per item besides itself, at least the --kr-k1 to serve (default 20)",
    )
    parser.add_argument("--device", default=None, help="knn: torch device, e.g. cpu or cuda (default: CUDA if any)")
    parser.add_argument("--output-dir", default=None, help="where to save the index (default: the store folder)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
    parser.add_argument(
        "--m", type=int, default=None, help="PQ sub-quantizers, must divide the dimension (default D/8)"
    )
    parser.add_argument("--nbits", type=int, default=8, help="bits per PQ code (default 8)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default min(nlist, 32))")
    parser.add_argument("--train-size", type=int, default=None, help="training vectors (default max(100k, 40 nlist))")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (default 32)")
    parser.add_argument("--ef-construction", type=int, default=80, help="HNSW build depth (default 80)")
    parser.add_argument("--ef-search", type=int, default=128, help="HNSW search depth (default 128)")
    parser.add_argument("--query", default=None, help="query store for the recall check (default: index rows)")
    parser.add_argument(
        "--sample", type=int, default=1000, help="queries in the recall check (default 1000; sharded: 0 skips it)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for training and recall samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verify_option(parser)
    args = parser.parse_args(argv)
    sharded = args.shards is not None or args.shard_rank or args.train_only or args.quantizer
    if sharded or len(index_store_paths(args.index)) > 1:
        return build_sharded(args)
    if args.type not in ANN_TYPES + ("knn",):
        raise MetricError(f"--type {args.type} is a sharded index type: add --shards W")
    if args.type == "knn":
        desc = build_store_graph(
            args.index,
            args.knn,
            out_dir=args.output_dir,
            device=args.device,
            progress=not args.no_progress,
            verify=not args.no_verify,
        )
        print(
            f"built k-NN graph of {desc['count']} items, {desc['width']} neighbours each (itself included): "
            f"{desc['path']}"
        )
        return
    options = AnnOptions(
        index_type=args.type,
        nlist=args.nlist,
        m=args.m,
        nbits=args.nbits,
        nprobe=args.nprobe,
        train_size=args.train_size,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        sample=args.sample,
        seed=args.seed,
    )
    params = build_ann_index(
        args.index,
        options,
        out_dir=args.output_dir,
        query_path=args.query,
        verify=not args.no_verify,
        progress=not args.no_progress,
    )
    settings = {
        k: params[k] for k in ("nlist", "m", "nbits", "nprobe", "hnsw_m", "ef_construction", "ef_search") if k in params
    }
    print(f"built {params['type']} index of {params['count']} x {params['dim']}: {params['index_path']}")
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    print(f"recall@{params['recall_k']} vs exact search on {params['recall_sample']} queries: {params['recall']:.4f}")


def build_sharded(args):
    """``--shards W`` / a folder of shard stores: train once, one IVF index per shard."""
    if args.type not in SHARDED_TYPES:
        raise MetricError(f"sharded indexes are IVF ones: choose --type {' or '.join(SHARDED_TYPES)}, not {args.type}")
    if args.query is not None:
        raise MetricError("--query is not used by a sharded build (each shard's recall uses its own rows)")
    options = ShardedIvfOptions(
        index_type=args.type,
        nlist=args.nlist,
        m=args.m,
        nbits=args.nbits,
        nprobe=args.nprobe,
        train_size=args.train_size,
        sample=args.sample,
        seed=args.seed,
    )
    layout = open_index(args.index, verify=not args.no_verify)
    out = build_sharded_index(
        layout,
        world=args.shards,
        options=options,
        out_dir=args.output_dir,
        quantizer=args.quantizer,
        ranks=args.shard_rank,
        train_only=args.train_only,
        progress=not args.no_progress,
    )
    t = out["trained"]
    settings = " ".join(f"{k}={t[k]}" for k in ("nlist", "m", "nbits", "nprobe") if k in t)
    where = t.get("path", args.quantizer)
    print(f"quantizer: {t['type']} {settings}, trained on {t['train_size']} rows: {where}")
    for p in out["shards"]:
        recall = "" if p["recall"] is None else f", recall@{p['recall_k']} {p['recall']:.4f}"
        rows = f"rows {p['start']}..{p['stop']}"
        print(f"shard {p['rank']} of {p['world']}: {rows}{recall}: {p['index_path']}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
