"""The visual report of a cohort (``ltnet segment --report DIR``): per scan a PNG (three
orthogonal planes through the scan, its labels overlaid beside it) and ``index.html``, the scans
worst predicted quality first with their flag, predicted Dice, brain extraction and volumes, each
linking its picture. Plain HTML with inline CSS and relative links: it opens from disk, with no
server and no network."""
import html
from pathlib import Path
from typing import List, Sequence

import numpy as np

from ltnet_keras.inference.pictures import label_colours, write_planes_png
from ltnet_keras.records import atomic_write_text

INDEX = "index.html"
PICTURES_DIR = "pictures"


def picture_path(report_dir, name: str) -> Path:
    return Path(report_dir) / PICTURES_DIR / f"{name}.png"


def write_scan_picture(report_dir, name: str, image: np.ndarray, affine, labels: np.ndarray,
                       protocol, caption: str = "") -> Path:
    """``pictures/<name>.png``: the scan alone, then with its labels, in three planes."""
    return write_planes_png(picture_path(report_dir, name), image, affine,
                            {"scan": None, "labels": labels}, label_colours(protocol.ids),
                            f"{name}{'  ' + caption if caption else ''}")


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#eee;position:sticky;top:0}td.name{text-align:left}
tr.check td{background:#fde2e1}td.flag{font-weight:bold}img{height:110px}"""


def _number(value, digits=1):
    return "" if value is None else f"{value:.{digits}f}"


def qc_order(records: Sequence[dict]) -> List[dict]:
    """Worst predicted quality first; scans without a prediction last, in list order."""
    def key(item):
        position, record = item
        predicted = record.get("qc", {}).get("predicted_dice")
        return (predicted is None, np.inf if predicted is None else predicted, position)
    return [record for _, record in sorted(enumerate(records), key=key)]


def write_index(report_dir, records: Sequence[dict], protocol) -> Path:
    """``index.html`` over ``records`` (from :mod:`scan_records`), worst QC first."""
    report_dir = Path(report_dir)
    ordered = qc_order(records)
    names = list(protocol.names)
    flagged = sum(1 for r in records if r.get("qc", {}).get("flag") == "check")
    head = ["picture", "scan", "QC", "predicted Dice", "skull", "brain mL", "total mL"] + names
    rows = []
    for record in ordered:
        qc = record.get("qc", {})
        picture = picture_path(report_dir, record["subject"])
        link = f"{PICTURES_DIR}/{html.escape(record['subject'])}.png"
        cells = [f'<a href="{link}"><img src="{link}" alt="{html.escape(record["subject"])}">'
                 "</a>" if picture.exists() else "(no picture)",
                 html.escape(record["subject"]), qc.get("flag", ""),
                 _number(100 * qc["predicted_dice"]) if "predicted_dice" in qc else "",
                 "on" if record["brain"].get("skull") else "off",
                 _number(record["brain"].get("brain_ml")),
                 _number(record["volumes"]["total"] / 1000.0)]
        cells += [_number(record["volumes"][n] / 1000.0, 2) for n in names]
        kind = ' class="check"' if qc.get("flag") == "check" else ""
        rows.append(f"<tr{kind}>" + "".join(
            f'<td class="{"name" if i == 1 else "flag" if i == 2 else ""}">{c}</td>'
            for i, c in enumerate(cells)) + "</tr>")
    text = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ltnet report</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>Segmentation report</h1>\n"
            f"<p>{len(records)} scans, {flagged} flagged <b>check</b>; worst predicted quality "
            "first. Volumes in mL (voxel count x voxel volume). Click a picture for full "
            "size.</p>\n<table>\n<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr>\n" + "\n".join(rows) + "\n</table>\n</body></html>\n")
    return atomic_write_text(report_dir / INDEX, text)
