#!/usr/bin/env python3
"""Search a query feature store in an index store and write the Kaggle results CSV.

    python tools/search.py --query QDIR --index IDIR --topk 100 --output results.csv \
        [--scores scores.csv] [--backend auto|faiss|torch] [--ann [--ann-type ivfpq|hnsw]] \
        [--qe K --qe-alpha A] [--dba K --dba-alpha A]
"""

import sys

from metric.utils.cli import make_parser, run_tool
from metric.retrieval.rerank import search_stores
from metric.retrieval.search import BACKENDS


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
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
    parser.add_argument("--ann-type", default=None, choices=("ivfpq", "hnsw"), help="which saved index (if several)")
    parser.add_argument("--ann-dir", default=None, help="folder of the approximate index (default: the index store)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default: as built)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW search depth (default: as built)")
    parser.add_argument("--qe", type=int, default=0, metavar="K", help="alpha-query-expansion with K neighbours")
    parser.add_argument("--qe-alpha", type=float, default=3.0, metavar="A", help="QE weight exponent (default 3)")
    parser.add_argument("--dba", type=int, default=0, metavar="K", help="database-side augmentation with K neighbours")
    parser.add_argument("--dba-alpha", type=float, default=3.0, metavar="A", help="DBA weight exponent (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = search_stores(
        args.query, args.index, args.output, topk=args.topk, scores_path=args.scores, backend=args.backend,
        device=args.device, chunk_size=args.chunk_size, query_chunk_size=args.batch, ann=args.ann,
        ann_type=args.ann_type, ann_dir=args.ann_dir, nprobe=args.nprobe, ef_search=args.ef_search,
        qe=args.qe, qe_alpha=args.qe_alpha, dba=args.dba, dba_alpha=args.dba_alpha,
        progress=not args.no_progress,
    )
    print(f"searched {summary['queries']} queries in {summary['index']} index items, top-{summary['topk']}")
    print(f"results: {summary['output']}")
    if "scores" in summary:
        print(f"scores: {summary['scores']}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
