#!/usr/bin/env python3
"""Search a query feature store in an index store and write the Kaggle results CSV.

    python tools/search.py --query QDIR --index IDIR --topk 100 --output results.csv \
        [--scores scores.csv] [--backend auto|faiss|torch] [--ann [--ann-type ivfpq|hnsw]] \
        [--qe K --qe-alpha A] [--dba K --dba-alpha A] \
        [--rerank [dba] [qe] [superglobal | kreciprocal]] [--sg-m M --sg-k K --sg-beta B] \
        [--kr-k1 K1 --kr-k2 K2 --kr-lambda L --kr-graph auto|saved|compute]

Re-rankers run in the order DBA, search, alpha-QE, then SuperGlobal or k-reciprocal
(docs/RETRIEVAL.md lists their parameters and costs).

Under torchrun the search is sharded over the processes (docs/RETRIEVAL.md "Sharded search"):

    torchrun --nproc_per_node 4 tools/search.py --query QDIR --index IDIR[.shards] --output results.csv \
        [--shard auto|index|queries] [--timeout SECONDS]
"""

import re
import shlex
import sys

from metric.retrieval.ann import ANN_TYPES, AnnSearchOptions
from metric.retrieval.ann_sharded import ann_shard_mode, ivf_local_search, wants_sharded_ivf
from metric.retrieval.pipeline import SearchOptions, search_stores
from metric.retrieval.rerank_plan import GRAPH_MODES, RERANKERS, RerankOptions
from metric.retrieval.search import BACKENDS
from metric.retrieval.sharded import SHARD_MODES, wants_sharding
from metric.retrieval.sharded_pipeline import DEFAULT_TIMEOUT_S, check_timeout, search_stores_sharded
from metric.utils.cli import add_verify_option, exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def original_search_form(args):
    """The error for the original project's ``search.py search_gpu Q, R, OUT [TOPK]`` (its README's
    form, commas and all), naming the equivalent command. It is refused, not translated: the
    original read pickled features and wrote a pickle of (id, distance) lists, where this tool
    reads feature stores and writes a results CSV."""
    words = [w for w in re.split(r"[,\s]+", " ".join(args)) if w]
    query, index, out, topk = (words + ["QDIR", "IDIR", "results.csv", "100"][len(words) :])[:4]
    out = re.sub(r"\.(pkl|pickle)$", ".csv", out)
    cmd = " ".join(shlex.quote(w) for w in ("--query", query, "--index", index, "--output", out, "--topk", topk))
    return (
        f"the original form 'search.py search_gpu QUERY, REFER, OUTPUT' is not supported (it read and wrote "
        f"pickles); run: python tools/search.py {cmd} (QUERY and REFER: feature store folders written by "
        "tools/extract_features.py; the output is a results CSV id,images)"
    )


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0] == "search_gpu":  # the original project's form: search.py search_gpu Q, R, OUT [TOPK]
        parser.error(original_search_form(argv[1:]))
    parser.add_argument("--query", required=True, help="query feature store folder")
    parser.add_argument("--index", required=True, help="index feature store folder")
    parser.add_argument("--output", required=True, help="results CSV to write (id,images)")
    parser.add_argument("--topk", type=int, default=100, help="results per query (default 100)")
    parser.add_argument("--scores", default=None, help="also write the scores CSV (id,scores) here")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="exact search backend (default auto)")
    parser.add_argument("--device", default=None, help="torch device for the torch backend, e.g. cpu or cuda:0")
    parser.add_argument("--chunk-size", type=int, default=None, help="index rows per chunk (default: 512 MB of scores)")
    parser.add_argument("--batch", type=int, default=None, help="queries per matrix product (torch backend)")
    parser.add_argument("--ann", action="store_true", help="use the approximate index built by tools/build_index.py")
    parser.add_argument(
        "--ann-type", default=None, choices=ANN_TYPES + ("ivfflat",), help="which saved index (if several)"
    )
    parser.add_argument("--ann-dir", default=None, help="folder of the approximate index (default: the index store)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default: as built)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW search depth (default: as built)")
    parser.add_argument(
        "--rerank",
        nargs="+",
        default=None,
        choices=RERANKERS,
        metavar="NAME",
        help="re-rankers, in this order: dba qe, then superglobal or kreciprocal "
        "(QE/DBA default K=2 unless --qe/--dba K)",
    )
    parser.add_argument("--qe", type=int, default=0, metavar="K", help="alpha-query-expansion with K neighbours")
    parser.add_argument("--qe-alpha", type=float, default=3.0, metavar="A", help="QE weight exponent (default 3)")
    parser.add_argument("--dba", type=int, default=0, metavar="K", help="database-side augmentation with K neighbours")
    parser.add_argument("--dba-alpha", type=float, default=3.0, metavar="A", help="DBA weight exponent (default 3)")
    parser.add_argument("--sg-m", type=int, default=400, metavar="M", help="SuperGlobal: candidates re-ranked (400)")
    parser.add_argument("--sg-k", type=int, default=9, metavar="K", help="SuperGlobal: neighbours per candidate (9)")
    parser.add_argument("--sg-beta", type=float, default=0.15, metavar="B", help="SuperGlobal: neighbour weight (0.15)")
    parser.add_argument("--kr-k1", type=int, default=20, metavar="K1", help="k-reciprocal: k1 (20)")
    parser.add_argument("--kr-k2", type=int, default=6, metavar="K2", help="k-reciprocal: k2, local expansion (6)")
    parser.add_argument(
        "--kr-lambda", type=float, default=0.3, metavar="L", help="k-reciprocal: weight of the original distance (0.3)"
    )
    parser.add_argument(
        "--kr-graph",
        default="auto",
        choices=GRAPH_MODES,
        help="k-reciprocal index graph: the saved one if valid (auto), only the saved one, or "
        "compute it (default auto)",
    )
    parser.add_argument("--graph-dir", default=None, help="folder of the saved k-NN graph (default: the index store)")
    parser.add_argument(
        "--shard",
        default=None,
        choices=SHARD_MODES,
        help="sharded search (default under torchrun, or for a folder of shard stores): cut the index or the "
        "queries over the processes, or pick by the memory each needs (auto)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"sharded search: seconds a process waits for the others before it stops (default {DEFAULT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--devices",
        default=None,
        metavar="DEV,DEV",
        help="sharded search: cut each process's rows over these devices (e.g. cuda:0,cuda:1), searched in "
        "parallel with the torch path and merged, no replica per device",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verify_option(parser)
    args = parser.parse_args(argv)
    check_timeout(args.timeout)
    check_distinct_paths(
        [("--output", args.output), ("--scores", args.scores)],
        [("--ann-dir", args.ann_dir), ("--graph-dir", args.graph_dir)],
        stores=[("--query", args.query), ("--index", args.index)],
    )
    rerank = RerankOptions(
        steps=tuple(args.rerank or ()),
        qe=args.qe,
        qe_alpha=args.qe_alpha,
        dba=args.dba,
        dba_alpha=args.dba_alpha,
        sg_m=args.sg_m,
        sg_k=args.sg_k,
        sg_beta=args.sg_beta,
        kr_k1=args.kr_k1,
        kr_k2=args.kr_k2,
        kr_lambda=args.kr_lambda,
        kr_graph=args.kr_graph,
        graph_dir=args.graph_dir,
    )
    ann = (
        AnnSearchOptions(index_type=args.ann_type, index_dir=args.ann_dir, nprobe=args.nprobe, ef_search=args.ef_search)
        if args.ann
        else None
    )
    options = SearchOptions(
        backend=args.backend,
        device=args.device,
        chunk_size=args.chunk_size,
        query_chunk_size=args.batch,
        ann=ann,
        rerank=rerank,
        verify=not args.no_verify,
        progress=not args.no_progress,
    )
    sharded_ivf = ann is not None and wants_sharded_ivf(ann, args.index)  # one process: all its shards
    if args.shard is not None or args.devices is not None or sharded_ivf or wants_sharding(args.index):
        summary = search_stores_sharded(
            args.query,
            args.index,
            args.output,
            topk=args.topk,
            scores_path=args.scores,
            options=options,
            shard=ann_shard_mode(args.shard) if ann is not None else args.shard or "auto",
            timeout_s=args.timeout,
            local_search=ivf_local_search(ann) if ann is not None else None,
            devices=[d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None,
        )
        if summary["rank"] != 0:
            return
    else:
        summary = search_stores(
            args.query, args.index, args.output, topk=args.topk, scores_path=args.scores, options=options
        )
    print(
        f"searched {summary['queries']} queries in {summary['index']} index items, top-{summary['topk']}"
        + (f", re-ranked with {' + '.join(summary['rerank'])}" if summary["rerank"] else "")
    )
    if "shard" in summary:
        print(f"sharded over {summary['world']} process(es) by {summary['shard']}")
    print(f"results: {summary['output']}")
    if "scores" in summary:
        print(f"scores: {summary['scores']}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
