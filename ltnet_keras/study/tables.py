"""The paper's tables from per-subject scores: Markdown, CSVs, a box plot, provenance.

A table is a list of :class:`Row` (a method's per-subject :class:`~ltnet_keras.evaluation.
SubjectScores`, the paper row it corresponds to, and optionally the weight set it was trained
with). :func:`write_table` writes, in one folder,

- ``<table>.md``: Mean (std), Min and Max over subjects of each subject's mean Dice over the
  merged structures (the paper's Tables 1-3 and 5), the paper's numbers beside ours; rows
  trained with several weight sets ("variants") get one column block per set;
- ``<table>.csv``: the same numbers, machine-readable;
- ``<table>_subjects.csv``: one line per row and subject (mean Dice, folding, each structure);
- ``<table>.png``: a box plot of the per-subject mean Dice, one box per row;

and :func:`write_provenance` adds ``provenance.json`` (configs, seeds, commit, versions).

The paper's numbers (:data:`PAPER_REFERENCE`, :data:`PAPER_TABLE4`) are kept here and nowhere
else. They are on CANDI (103 T1 scans, 28 structures, 160x160x128 crops, long GPU training);
ours are on LPBA40 (56 labels merged into 28 mostly cortical structures), so only the ordering
of the methods can be compared, never the absolute values.
"""
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ltnet_keras import evaluation
from ltnet_keras.config import ExperimentConfig, config_to_dict
from ltnet_keras.records import (atomic_write_text, csv_text, package_versions,
                                 without_machine_paths)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Said under every table: the subjects scored chose the recipe and every default.
VALIDATION_NOTE = ("These are validation subjects, not a test set: the recipe and every default "
                   "were chosen on them (the nine LPBA40 subjects kept aside are the test set).")

PAPER_NOTE = ("Paper numbers are on CANDI (103 scans, 28 mostly subcortical and tissue labels, "
              "160x160x128 crops, long training on two GPUs); ours are on LPBA40 (28 mostly "
              "cortical merged structures) at a reduced grid and step budget. Compare the ordering "
              "of the rows, not the absolute values.")

# ----------------------------------------------------------------------------- the paper's numbers
# Mean (std), min, max of the per-subject mean Dice (%) over the CANDI test subjects
# (Wang et al., CVPR 2020, Tables 1, 2, 3 and 5). CANDI numbers: NOT comparable in absolute value.
PAPER_REFERENCE: Dict[str, Dict[str, tuple]] = {
    "table1": {
        "VoxelMorph": (76.0, 9.7, 61.7, 80.1),
        "+ L_GAN": (79.0, 3.1, 72.7, 81.9),
        "+ L_GAN + L_cyc": (79.2, 2.8, 72.7, 82.1),
    },
    "table2": {
        "Baseline": (79.2, 2.8, 72.7, 82.1),
        "+ L_trans": (80.9, 2.7, 73.6, 83.2),
        "+ L_anatomy_cyc": (80.5, 2.5, 74.2, 83.1),
        "+ L_trans + L_anatomy_cyc": (81.4, 2.6, 74.4, 83.8),
        "+ L_trans + L_anatomy_cyc + L_diff_cyc": (82.3, 2.5, 75.6, 84.2),
    },
    "table3": {
        "MABMIS, 2 atlases": (70.4, 4.4, 63.0, 75.9),
        "MABMIS, 3 atlases": (74.5, 5.2, 63.2, 80.4),
        "MABMIS, 4 atlases": (77.8, 3.9, 72.0, 82.5),
        "MABMIS, 5 atlases": (81.1, 3.6, 76.0, 85.6),
        "LT-Net, 1 atlas": (82.3, 2.5, 75.6, 84.2),
    },
    "table5": {
        "VoxelMorph": (76.0, 9.7, 61.7, 80.1),
        "DataAug": (80.4, 4.3, 73.8, 84.0),
        "LT-Net": (82.3, 2.5, 75.6, 84.2),
        "U-Net (upper bound)": (86.5, 6.3, 83.7, 89.2),
    },
}
# Table 4: mean Dice (%) per CANDI structure (left and right merged).
PAPER_TABLE4 = {
    "structures": ["Cerebral-WM", "Cerebral-CX", "Lateral-Vent", "Cerebellum-WM", "Cerebellum-CX",
                   "Thalamus-Proper", "Caudate", "Putamen", "Pallidum", "3rd-Vent", "4th-Vent",
                   "Brain-Stem", "Hippocampus", "Amygdala", "CSF", "VentralDC"],
    "rows": {
        "VoxelMorph": [81.7, 87.1, 76.7, 74.0, 86.3, 84.7, 79.6, 83.3, 74.0, 62.9, 69.8, 87.1,
                       59.2, 66.5, 50.9, 76.6],
        "DataAug": [90.5, 93.3, 87.5, 82.3, 93.2, 87.3, 81.3, 82.8, 73.7, 66.3, 72.2, 90.5, 72.5,
                    69.2, 63.3, 80.3],
        "LT-Net": [85.8, 90.9, 83.1, 80.0, 91.6, 87.9, 85.5, 88.4, 80.5, 68.4, 79.7, 92.4, 71.6,
                   71.6, 67.1, 82.3],
        "U-Net (upper bound)": [92.0, 93.1, 91.8, 87.9, 93.1, 90.6, 88.1, 88.7, 82.5, 79.0, 84.9,
                                92.2, 80.3, 75.3, 69.8, 85.9],
    },
}
# The few LPBA40 structures that also exist in CANDI's protocol (for a side-by-side look only).
SHARED_STRUCTURES = {"caudate": "Caudate", "putamen": "Putamen", "hippocampus": "Hippocampus",
                     "brainstem": "Brain-Stem"}


# ----------------------------------------------------------------------------- rows

@dataclasses.dataclass
class Row:
    """One line of a table: our scores (None: not reproduced) and the paper row next to it.

    ``variant`` names the weight set the row was trained with (e.g. ``"paper weights"``,
    ``"recipe weights"``) when a table shows its rows under several; ``""`` for a row that is
    the same under every set (the no-registration floor, VoxelMorph) or a table with one set.
    """
    label: str
    scores: Optional[List[evaluation.SubjectScores]]
    paper: Optional[str] = None
    note: str = ""
    variant: str = ""

    @property
    def summary(self) -> Optional[dict]:
        return evaluation.summarise(self.scores) if self.scores else None

    @property
    def name(self) -> str:
        """The row's unique name in CSVs and plots: its label, with the variant if any."""
        return f"{self.label} [{self.variant}]" if self.variant else self.label


def paper_format(summary: Optional[Mapping[str, float]]) -> tuple:
    """``("mean (std)", "min", "max")`` in percent with one decimal, as the paper prints them;
    dashes when there is no summary."""
    if summary is None:
        return "—", "—", "—"
    return (f"{summary['mean']:.1f} ({summary['std']:.1f})", f"{summary['min']:.1f}",
            f"{summary['max']:.1f}")


def _reference_cells(row: Row, reference: Mapping[str, tuple]) -> List[str]:
    ref = reference.get(row.paper) if row.paper else None
    if not ref:
        return ["—"] * 4
    return [row.paper, f"{ref[0]:.1f} ({ref[1]:.1f})", f"{ref[2]:.1f}", f"{ref[3]:.1f}"]


def variants_of(rows: Sequence[Row]) -> List[str]:
    """The weight sets a table shows, in order of first appearance."""
    found: List[str] = []
    for row in rows:
        if row.variant and row.variant not in found:
            found.append(row.variant)
    return found


def _grouped(rows: Sequence[Row]) -> List[List[Row]]:
    """Rows with the same label (one per variant) together, in order of first appearance."""
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    return list(groups.values())


def format_markdown_table(rows: Sequence[Row], reference: Mapping[str, tuple]) -> str:
    """Our Mean (std) / Min / Max next to the paper's row (CANDI) for each line; with variants,
    one Mean (std) / Min / Max block per weight set, side by side (a row without a variant fills
    every block)."""
    variants = variants_of(rows)
    paper_header = "Paper row (CANDI) | Paper Mean (std) | Paper Min | Paper Max"
    if not variants:
        lines = [f"| Method | Mean (std) | Min | Max | n | {paper_header} |", "|" + "---|" * 9]
        for row in rows:
            s = row.summary
            ours = [*paper_format(s), str(s["n"]) if s else "—"]
            if s is None and row.note:
                ours[0] = row.note
            lines.append("| " + " | ".join([row.label, *ours, *_reference_cells(row, reference)])
                         + " |")
        return "\n".join(lines)

    blocks = " | ".join(f"{v}: Mean (std) | Min | Max" for v in variants)
    lines = [f"| Method | {blocks} | n | {paper_header} |",
             "|" + "---|" * (1 + 3 * len(variants) + 1 + 4)]
    for group in _grouped(rows):
        by_variant = {row.variant: row for row in group}
        cells, counts = [], []
        for variant in variants:
            row = by_variant.get(variant, by_variant.get(""))
            s = row.summary if row else None
            block = list(paper_format(s))
            if s is None and row is not None and row.note:
                block[0] = row.note
            cells += block
            if s:
                counts.append(str(s["n"]))
        n = "/".join(dict.fromkeys(counts)) or "—"
        lines.append("| " + " | ".join([group[0].label, *cells, n,
                                        *_reference_cells(group[0], reference)]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CSV files

def _percent(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100.0 * value:.4f}"


def subjects_csv_text(rows: Sequence[Row]) -> str:
    """One line per row and subject: the row's name, its variant, the subject, its mean Dice
    (%) over merged structures and over labels, the folding of its forward field (when scored),
    then each structure's Dice (%). Rows without scores are left out."""
    scored = [row for row in rows if row.scores]
    structures: List[str] = []
    for row in scored:
        for s in row.scores:
            structures += [name for name in s.structures if name not in structures]
    deformation = [m for m in evaluation.DEFORMATION_METRICS
                   if any(m in s.deformation for row in scored for s in row.scores)]
    header = (["row", "variant", "subject", "mean_dice", "mean_label_dice"] + deformation
              + [f"dice_{name}" for name in structures])
    body = []
    for row in scored:
        for s in row.scores:
            body.append([row.label, row.variant, s.subject, _percent(s.mean_structure),
                         _percent(s.mean_label)]
                        + [f"{s.deformation[m]:.6f}" if m in s.deformation else ""
                           for m in deformation]
                        + [_percent(s.structures.get(name, float("nan")))
                           for name in structures])
    return csv_text(header, body)


def summary_csv_text(rows: Sequence[Row], reference: Mapping[str, tuple]) -> str:
    """One line per row: method, level, n, mean, std, min, max (%), the paper's row, the note
    and the row's variant (weight set; empty for a table with one)."""
    body = []
    for row in rows:
        s = row.summary
        ref = reference.get(row.paper) if row.paper else None
        body.append([row.label, "structure", s["n"] if s else "",
                     *([f"{s[k]:.4f}" for k in ("mean", "std", "min", "max")] if s else [""] * 4),
                     row.paper or "", *(list(ref) if ref else [""] * 4), row.note, row.variant])
    header = ["method", "level", "n", "mean", "std", "min", "max", "paper_row", "paper_mean",
              "paper_std", "paper_min", "paper_max", "note", "variant"]
    return csv_text(header, body)


# ----------------------------------------------------------------------------- box plot

VARIANT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def plot_boxes(rows: Sequence[Row], path, title: str = "") -> List[str]:
    """Horizontal box plot of the per-subject mean Dice (%), one box per row with scores (first
    row on top), each subject a dot; rows coloured by variant. Returns the boxes' names."""
    from matplotlib.figure import Figure
    scored = [row for row in rows if row.scores]
    if not scored:
        raise ValueError(f"{path}: no row has scores to plot")
    values = [[100.0 * s.mean_structure for s in row.scores
               if not math.isnan(s.mean_structure)] for row in scored]
    names = [row.name for row in scored]
    variants = variants_of(scored)
    colours = [VARIANT_COLOURS[variants.index(row.variant) % len(VARIANT_COLOURS)]
               if row.variant else "lightgrey" for row in scored]
    fig = Figure(figsize=(8.0, 0.42 * len(scored) + 1.3))
    ax = fig.subplots()
    positions = list(range(len(scored), 0, -1))
    boxes = ax.boxplot(values, positions=positions, orientation="horizontal", widths=0.6,
                       patch_artist=True, showfliers=False)
    for patch, colour in zip(boxes["boxes"], colours):
        patch.set_facecolor(colour)
        patch.set_alpha(0.6)
    for y, subject_values in zip(positions, values):
        ax.plot(subject_values, [y] * len(subject_values), "k.", markersize=3)
    ax.set_yticks(positions)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("per-subject mean Dice over merged structures (%)")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return [names[i] for i in range(len(boxes["boxes"]))]


# ----------------------------------------------------------------------------- whole tables

def _write_row_files(out_root: Path, table: str, rows: Sequence[Row], title: str,
                     reference: Mapping[str, tuple]) -> None:
    atomic_write_text(out_root / f"{table}.csv", summary_csv_text(rows, reference))
    if any(row.scores for row in rows):
        atomic_write_text(out_root / f"{table}_subjects.csv", subjects_csv_text(rows))
        plot_boxes(rows, out_root / f"{table}.png", title)


def write_table(out_root, table: str, title: str, rows: Sequence[Row], notes: Sequence[str] = (),
                structures: bool = True) -> str:
    """Write ``<table>.md``, ``<table>.csv``, ``<table>_subjects.csv`` and ``<table>.png`` in
    ``out_root``; return the Markdown. Scores are structure-level: each subject's mean Dice over
    the merged structures; the paper's numbers are :data:`PAPER_REFERENCE` ``[table]``."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    _write_row_files(out_root, table, rows, title, PAPER_REFERENCE.get(table, {}))
    markdown = table_markdown(table, title, rows, notes, structures)
    atomic_write_text(out_root / f"{table}.md", markdown)
    return markdown


def table_markdown(table: str, title: str, rows: Sequence[Row], notes: Sequence[str] = (),
                   structures: bool = True) -> str:
    """``<table>.md`` of :func:`write_table`: our rows beside the paper's, the notes, and with
    ``structures`` the per-structure means of every row with scores."""
    reference = PAPER_REFERENCE.get(table, {})
    scored = {row.name: row.scores for row in rows if row.scores}
    text = [f"# {title}", "",
            "Dice (%) on the LPBA40 validation subjects: each subject's mean over the merged "
            "(left/right) structures; Mean (std), Min and Max over subjects (std with ddof=0).",
            "", VALIDATION_NOTE, "", format_markdown_table(rows, reference), "",
            f"Per-subject values: `{table}_subjects.csv`; box plot: `{table}.png`.", "",
            f"Note: {PAPER_NOTE}", ""]
    for note in notes:
        text += [f"Note: {note}", ""]
    if structures and scored:
        text += ["Per structure (mean (std) over subjects):", "", "```",
                 evaluation.format_structure_table(scored), "```", ""]
    return "\n".join(text)


def write_structure_table(out_root, table: str, title: str,
                          results: Mapping[str, List[evaluation.SubjectScores]],
                          paper_rows: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """Table 4: Dice (%) of each merged structure, mean (std) over the validation subjects, one
    column per method (the paper's layout transposed: LPBA40 has 28 structures). ``paper_rows``
    maps our method label to the paper's Table 4 row for the structures both protocols share.
    Writes ``<table>.md``, ``<table>.csv`` (method, structure, n, mean, std, paper),
    ``<table>_subjects.csv`` and the box plot ``<table>.png``."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    paper_index = {name: i for i, name in enumerate(PAPER_TABLE4["structures"])}
    body = []
    for method, scores in results.items():
        paper = PAPER_TABLE4["rows"].get(paper_rows.get(method, ""))
        for structure, s in evaluation.structure_summary(scores).items():
            shared = SHARED_STRUCTURES.get(structure)
            ref = paper[paper_index[shared]] if paper and shared else ""
            body.append([method, structure, len(scores), f"{s['mean']:.4f}", f"{s['std']:.4f}",
                         shared or "", ref])
    atomic_write_text(out_root / f"{table}.csv", csv_text(
        ["method", "structure", "n", "mean", "std", "paper_structure", "paper_mean"], body))
    rows = [Row(method, list(scores)) for method, scores in results.items() if scores]
    if rows:
        atomic_write_text(out_root / f"{table}_subjects.csv", subjects_csv_text(rows))
        plot_boxes(rows, out_root / f"{table}.png", title)

    markdown = structure_table_markdown(table, title, results, paper_rows, notes)
    atomic_write_text(out_root / f"{table}.md", markdown)
    return markdown


def structure_table_markdown(table: str, title: str,
                             results: Mapping[str, List[evaluation.SubjectScores]],
                             paper_rows: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """``<table>.md`` of :func:`write_structure_table`."""
    paper_index = {name: i for i, name in enumerate(PAPER_TABLE4["structures"])}
    summaries = {method: evaluation.summarise(scores) for method, scores in results.items()}
    shared_lines = ["| Structure (LPBA40 / CANDI) | " + " | ".join(
        f"{m} ours | {paper_rows[m]} paper" for m in results if m in paper_rows) + " |"]
    shared_lines.append("|" + "---|" * (1 + 2 * sum(m in paper_rows for m in results)))
    per_structure = {m: evaluation.structure_summary(s) for m, s in results.items()}
    for ours, theirs in SHARED_STRUCTURES.items():
        cells = []
        for method in results:
            if method not in paper_rows:
                continue
            s = per_structure[method].get(ours)
            cells.append(f"{s['mean']:.1f}" if s else "—")
            cells.append(f"{PAPER_TABLE4['rows'][paper_rows[method]][paper_index[theirs]]:.1f}")
        shared_lines.append(f"| {ours} / {theirs} | " + " | ".join(cells) + " |")
    paper_header = "| Method | " + " | ".join(PAPER_TABLE4["structures"]) + " |"
    paper_lines = [paper_header, "|" + "---|" * (1 + len(PAPER_TABLE4["structures"]))]
    paper_lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |"
                    for name, values in PAPER_TABLE4["rows"].items()]
    text = [f"# {title}", "",
            "Dice (%) of each merged (left/right) LPBA40 structure, mean (std) over the validation "
            "subjects:", "", VALIDATION_NOTE, "", "```", evaluation.format_structure_table(results), "```", "",
            "Mean over structures, per subject (Mean (std), Min, Max over subjects):", "", "```",
            evaluation.format_summary_table(summaries), "```", "",
            f"Per-subject values: `{table}_subjects.csv`; box plot: `{table}.png`.", "",
            "Structures both protocols label (ours on LPBA40, the paper's on CANDI):", "",
            *shared_lines, "", "The paper's Table 4 (CANDI; different structures, not comparable "
            "in absolute value):", "", *paper_lines, "", f"Note: {PAPER_NOTE}", ""]
    text += [f"Note: {n}" for n in notes]
    return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------- provenance

def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_provenance(out_root, table: str, configs: Mapping[str, ExperimentConfig],
                     overrides: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """``provenance.json``: what produced the table (configs, commit, versions, seeds, date)."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    status = _git("status", "--porcelain")
    record = {
        "table": table,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": package_versions(),
        "platform": platform.platform(),
        "overrides": dict(overrides or {}),
        "seeds": {row: c.train.seed for row, c in configs.items()},
        "configs": {row: config_to_dict(c) for row, c in configs.items()},
    }
    record.update(extra or {})
    # Paths under the data roots or the repository are recorded relative to them.
    roots = {c.data.resolved_root() for c in configs.values()}
    roots |= {Path(_git("rev-parse", "--show-toplevel") or Path.cwd())}
    record = without_machine_paths(record, roots)
    path = out_root / "provenance.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return path
