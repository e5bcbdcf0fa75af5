"""Result gallery: one self-contained HTML page showing queries and their top-k results.

Every thumbnail is embedded as a base64 JPEG data URI (resized with OpenCV so its longer side
is ``thumb_size`` pixels), so the page opens anywhere, offline, and never shows a broken link:
an image that cannot be found or read is drawn as a labelled placeholder. With a ground truth,
a relevant result gets a green frame and a non-relevant one a red frame, each query shows its
AP@100 (the Kaggle GLR definition, over its whole result list, not only the shown top-k), and the
header gives mAP@100 over all scored queries. The header also lists the run's figures a caller
passes (``figures``: recall@1, mAP@R, the checkpoint, ...).

Images are looked up as ``<root>/<id>.<ext>`` (jpg, jpeg, png, any letter case) and otherwise
by file-name stem anywhere below the root (the stem map is built once, on first need).
"""

import base64
import html
import logging
import os

import cv2
from tqdm import tqdm

from metric.retrieval.groundtruth import read_glr_solution
from metric.retrieval.metrics_glr import glr_average_precisions
from metric.retrieval.results import check_output_file, read_results_csv, read_scores_csv
from metric.utils import io
from metric.utils.errors import DataError
from metric.utils.imagefile import load_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageFinder:
    """Finds the image file of an id below a root folder."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise DataError(f"image root {root} is not a folder; check --query-root / --index-root")
        self.root = root
        self._by_stem = None

    def _scan(self):
        by_stem = {}
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    by_stem.setdefault(stem, os.path.join(folder, name))
        return by_stem

    def find(self, image_id):
        """Path of the image of ``image_id``, or ``None``."""
        for ext in IMAGE_EXTENSIONS:
            for variant in (ext, ext.upper()):
                path = os.path.join(self.root, image_id + variant)
                if os.path.isfile(path):
                    return path
        if self._by_stem is None:
            self._by_stem = self._scan()
        return self._by_stem.get(os.path.basename(image_id))


def thumbnail_data_uri(path, size=128, quality=85):
    """``data:image/jpeg;base64,...`` of the image at ``path`` resized to ``size`` px (longer
    side), or ``None`` when it cannot be read."""
    image, _ = load_image(path)  # the pixel budget, and libjpeg/libpng messages kept off stderr
    if image is None:
        return None
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #fafafa; }
.row { display: flex; align-items: flex-start; gap: 6px; padding: 6px 0; border-bottom: 1px solid #ddd; }
.cell { display: flex; flex-direction: column; align-items: center; width: SIZEpx; font-size: 11px; }
.cell img, .cell .missing { max-width: SIZEpx; max-height: SIZEpx; border: 4px solid transparent; }
.cell.query img, .cell.query .missing { border-color: #3366cc; }
.cell.relevant img, .cell.relevant .missing { border-color: #2a9d3a; }
.cell.wrong img, .cell.wrong .missing { border-color: #d62728; }
.missing { width: SIZEpx; height: SIZEpx; box-sizing: border-box; background: #eee; color: #777;
           display: flex; align-items: center; justify-content: center; text-align: center; }
.caption { max-width: SIZEpx; overflow-wrap: anywhere; text-align: center; }
.sep { width: 2px; align-self: stretch; background: #bbb; margin: 0 4px; }
.figures { border-collapse: collapse; margin: 0.5em 0 1em; }
.figures th, .figures td { border: 1px solid #ccc; padding: 3px 10px; text-align: left; }
.ap { font-weight: bold; }
"""


class _Thumbnails:
    """Caches thumbnails by path and counts what could not be shown."""

    def __init__(self, size):
        self.size, self.cache, self.missing = size, {}, 0

    def html_for(self, finder, image_id):
        path = finder.find(image_id)
        if path is not None and path not in self.cache:
            self.cache[path] = thumbnail_data_uri(path, self.size)
        uri = self.cache.get(path) if path is not None else None
        if uri is None:
            self.missing += 1
            why = "missing" if path is None else "unreadable"
            return f'<div class="missing">{why}<br>{html.escape(image_id)}</div>'
        return f'<img src="{uri}" alt="{html.escape(image_id, quote=True)}">'


def _format_figure(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_gallery(
    rows,
    query_finder,
    index_finder,
    relevant=None,
    thumb_size=128,
    title="retrieval results",
    progress=False,
    figures=None,
    query_ap=None,
):
    """HTML text of a gallery. ``rows`` is a list of ``(query id, [(index id, score or None)])``;
    ``relevant`` maps a query id to the set of its relevant index ids (or is ``None``);
    ``figures`` (``{name: value}``) is shown as a table in the header; ``query_ap`` maps a query
    id to its average precision, shown under the query."""
    thumbs = _Thumbnails(thumb_size)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE.replace('SIZE', str(int(thumb_size)))}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if figures:
        parts.append(
            '<table class="figures">'
            + "".join(
                f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(_format_figure(value))}</td></tr>"
                for name, value in figures.items()
            )
            + "</table>"
        )
    if relevant is not None:
        parts.append("<p>green frame: relevant &middot; red frame: not relevant</p>")
    for qid, results in tqdm(rows, desc="gallery", unit="query", disable=not progress):
        ap = (query_ap or {}).get(qid)
        ap_line = "" if ap is None else f'<br><span class="ap">AP@100 {ap:.4f}</span>'
        cells = [
            f'<div class="cell query">{thumbs.html_for(query_finder, qid)}'
            f'<div class="caption">query<br>{html.escape(qid)}{ap_line}</div></div>',
            '<div class="sep"></div>',
        ]
        truth = relevant.get(qid) if relevant is not None else None
        for rank, (image_id, score) in enumerate(results, start=1):
            frame = "" if truth is None else (" relevant" if image_id in truth else " wrong")
            caption = f"#{rank}" + ("" if score is None else f" &middot; {score:.4f}")
            cells.append(
                f'<div class="cell{frame}">{thumbs.html_for(index_finder, image_id)}'
                f'<div class="caption">{caption}<br>{html.escape(image_id)}</div></div>'
            )
        parts.append(f'<div class="row" data-query="{html.escape(qid, quote=True)}">' + "".join(cells) + "</div>")
    parts.append("</body></html>")
    if thumbs.missing:
        logger.warning("%d images could not be found or read; shown as placeholders", thumbs.missing)
    return "\n".join(parts) + "\n"


def build_gallery(
    results_path,
    query_root,
    index_root,
    output,
    gt_path=None,
    scores_path=None,
    topk=10,
    max_queries=50,
    thumb_size=128,
    progress=False,
    figures=None,
):
    """Write the HTML gallery of a results CSV to ``output`` (atomically); returns its path.

    Shows the first ``max_queries`` queries of the results file, each with its first ``topk``
    results; scores come from ``scores_path`` (``id,scores``) and relevance from the GLR
    solution ``gt_path`` (``id,images,Usage``) when given, with each query's AP@100 and, in the
    header, mAP@100 over all scored queries after the caller's ``figures`` (``{name: value}``).
    """
    if topk < 1 or max_queries < 1 or thumb_size < 8:
        raise DataError(
            f"--topk ({topk}) and --max-queries ({max_queries}) must be at least 1 and the "
            f"thumbnail size ({thumb_size}) at least 8"
        )
    check_output_file(output, "gallery")
    query_finder, index_finder = ImageFinder(query_root), ImageFinder(index_root)
    results = read_results_csv(results_path)
    scores = read_scores_csv(scores_path) if scores_path is not None else {}
    relevant, query_ap, figures = None, None, dict(figures or {})
    if gt_path is not None:
        solution = read_glr_solution(gt_path)
        relevant = {q: set(ids) for q, (ids, usage) in solution.items() if usage != "Ignored"}
        query_ap = glr_average_precisions(results, solution, k=100)
        if query_ap:
            figures[f"mAP@100 ({len(query_ap)} scored queries)"] = sum(query_ap.values()) / len(query_ap)
    rows = []
    for qid, ids in list(results.items())[:max_queries]:
        query_scores = scores.get(qid, [])
        rows.append(
            (
                qid,
                [
                    (image_id, query_scores[i] if i < len(query_scores) else None)
                    for i, image_id in enumerate(ids[:topk])
                ],
            )
        )
    text = render_gallery(
        rows,
        query_finder,
        index_finder,
        relevant,
        thumb_size,
        title=f"retrieval results: {os.path.basename(results_path)}",
        progress=progress,
        figures=figures,
        query_ap=query_ap,
    )
    output = io.write_text_atomic(output, text, what="gallery")
    logger.info("gallery of %d queries written to %s", len(rows), output)
    return output
