"""Write a self-contained HTML gallery of retrieval results (queries and their top-k images).

    python tools/visualize.py --results results.csv --query-root Q --index-root I \
        [--gt retrieval_solution.csv] [--scores scores.csv] [--topk 10] [--max-queries 50] \
        --output gallery.html
"""

from metric.retrieval.gallery import build_gallery
from metric.utils.cli import exit_tool, make_parser, run_tool
from metric.utils.io import check_distinct_paths


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--results", required=True, help="results CSV (id,images), best first")
    parser.add_argument("--query-root", required=True, help="folder holding the query images")
    parser.add_argument("--index-root", required=True, help="folder holding the index images")
    parser.add_argument("--gt", help="retrieval_solution.csv: green/red frames for relevant/not")
    parser.add_argument("--scores", help="scores CSV (id,scores) written next to the results")
    parser.add_argument("--topk", type=int, default=10, help="results shown per query (default 10)")
    parser.add_argument("--max-queries", type=int, default=50, help="queries shown (default 50)")
    parser.add_argument("--thumb-size", type=int, default=128, help="thumbnail size in px (default 128)")
    parser.add_argument("--output", required=True, help="HTML file to write")
    args = parser.parse_args(argv)
    check_distinct_paths(
        [("--output", args.output)], [("--results", args.results), ("--gt", args.gt), ("--scores", args.scores)]
    )

    path = build_gallery(
        args.results,
        args.query_root,
        args.index_root,
        args.output,
        gt_path=args.gt,
        scores_path=args.scores,
        topk=args.topk,
        max_queries=args.max_queries,
        thumb_size=args.thumb_size,
        progress=True,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
