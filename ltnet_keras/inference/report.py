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
    """``pictures/<name>.png``: the scan with its labels in three planes, side by side."""
    return write_planes_png(picture_path(report_dir, name), image, affine, {"labels": labels},
                            label_colours(protocol.ids),
                            f"{name}{'  ' + caption if caption else ''}", dpi=72,
                            planes_across=True)


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#eee}td.name{text-align:left}tr.check td{background:#fde2e1}
td.flag{font-weight:bold}img{height:150px}.wide{overflow-x:auto;max-width:100%}"""


def _number(value, digits=1):
    return "" if value is None else f"{value:.{digits}f}"


def _row(cells, check=False, first_left=1) -> str:
    kind = ' class="check"' if check else ""
    tds = [f'<td class="name">{c}</td>' if i == first_left else f"<td>{c}</td>"
           for i, c in enumerate(cells)]
    return f"<tr{kind}>" + "".join(tds) + "</tr>"


def _weakest(qc: dict) -> str:
    """The merged structure with the lowest predicted Dice, e.g. ``Amygdala 61.0``."""
    parts = {k[len("predicted_dice_"):]: v for k, v in qc.items()
             if k.startswith("predicted_dice_")}
    if not parts:
        return ""
    name = min(parts, key=parts.get)
    return f"{html.escape(name)} {100 * parts[name]:.1f}"


def qc_order(records: Sequence[dict]) -> List[dict]:
    """Worst predicted quality first; scans without a prediction last, in list order."""
    def key(item):
        position, record = item
        predicted = record.get("qc", {}).get("predicted_dice")
        return (predicted is None, np.inf if predicted is None else predicted, position)
    return [record for _, record in sorted(enumerate(records), key=key)]


def write_index(report_dir, records: Sequence[dict], protocol) -> Path:
    """``index.html`` over ``records`` (from :mod:`scan_records`): a table of the scans worst
    QC first (picture, flag, predicted Dice, weakest structure, skull, brain and labelled
    volume), then every label's volume per scan in the same order."""
    report_dir = Path(report_dir)
    ordered = qc_order(records)
    names = list(protocol.names)
    flagged = sum(1 for r in records if r.get("qc", {}).get("flag") == "check")
    head = ["picture", "scan", "QC", "predicted Dice", "weakest structure (predicted Dice)",
            "skull", "brain mL", "labelled mL"]
    rows, volume_rows = [], []
    for record in ordered:
        qc = record.get("qc", {})
        name = html.escape(record["subject"])
        link = f"{PICTURES_DIR}/{name}.png"
        picture = (f'<a href="{link}"><img src="{link}" alt="{name}"></a>'
                   if picture_path(report_dir, record["subject"]).exists() else "(no picture)")
        brain = record.get("brain", {})
        rows.append(_row([
            picture, f'<a id="{name}"></a>{name}', qc.get("flag", ""),
            _number(100 * qc["predicted_dice"]) if "predicted_dice" in qc else "",
            _weakest(qc), "on" if brain.get("skull") else "off",
            _number(brain.get("brain_ml")), _number(record["volumes"]["total"] / 1000.0)],
            qc.get("flag") == "check"))
        volume_rows.append(_row([name] + [_number(record["volumes"][n] / 1000.0, 2)
                                          for n in names], qc.get("flag") == "check", 0))
    text = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ltnet report</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>Segmentation report</h1>\n"
            f"<p>{len(records)} scans, {flagged} flagged <b>check</b> (red); worst predicted "
            "quality first. Click a picture for full size.</p>\n<table>\n<tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n"
            + "\n".join(rows) + "\n</table>\n<h2>Volumes (mL: voxel count x voxel volume)"
            "</h2>\n<div class=\"wide\"><table>\n<tr><th>scan</th>"
            + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>\n"
            + "\n".join(volume_rows) + "\n</table></div>\n</body></html>\n")
    return atomic_write_text(report_dir / INDEX, text)
