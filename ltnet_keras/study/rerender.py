"""Re-render a committed table's Markdown from its CSVs, without training or scoring again:
the rows and per-subject Dice come from ``<table>.csv`` and ``<table>_subjects.csv``, the title
and notes from the Markdown being replaced (with its wording brought up to date). Only the
Markdown is written; the CSVs and plots stay as they are."""
import csv
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

from ltnet_keras.evaluation import DEFORMATION_METRICS, SubjectScores
from ltnet_keras.records import atomic_write_text
from ltnet_keras.study.tables import (PAPER_NOTE, Row, structure_table_markdown,
                                      table_markdown)

#: Old wording -> current wording. S31-S40 chose the recipe and every default: they are
#: validation subjects, not held-out ones.
WORDING = (("held-out", "validation"), ("Held-out", "Validation"), ("ltnet_keras.dataaug",
           "ltnet_keras.baselines.dataaug"), ("ltnet_keras.segnet", "ltnet_keras.baselines.segnet"))


def _reworded(text: str) -> str:
    for old, new in WORDING:
        text = text.replace(old, new)
    return text


def _read_csv(path: Path) -> List[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def subject_scores(path) -> Dict[Tuple[str, str], List[SubjectScores]]:
    """``(row label, variant) -> scores`` from a per-subject CSV: the tables' own format
    (``row, variant, subject, mean_dice, ..., dice_<structure>``) or Table 5's (``row, method,
    subject, mean_structure, mean_label, <structure>...``). Dice values are fractions."""
    scores: Dict[Tuple[str, str], List[SubjectScores]] = {}
    for line in _read_csv(Path(path)):
        if "method" in line:       # Table 5: the label is in "method", structures unprefixed
            key = (line["method"], "")
            skip = {"row", "method", "subject", "mean_structure", "mean_label"}
            structures = {k: float(v) / 100.0 for k, v in line.items() if k not in skip}
        else:
            key = (line["row"], line["variant"])
            structures = {k[len("dice_"):]: float(v) / 100.0 for k, v in line.items()
                          if k.startswith("dice_")}
        deformation = {m: float(line[m]) for m in DEFORMATION_METRICS if line.get(m)}
        scores.setdefault(key, []).append(SubjectScores(line["subject"], {}, structures,
                                                        deformation))
    return scores


def rows_from_csvs(out_root, table: str) -> List[Row]:
    """The table's rows, in order, with their paper row, note, variant and per-subject scores."""
    out_root = Path(out_root)
    scores = subject_scores(out_root / f"{table}_subjects.csv")
    rows = []
    for line in _read_csv(out_root / f"{table}.csv"):
        variant = line.get("variant", "")
        rows.append(Row(line["method"], scores.get((line["method"], variant)),
                        line["paper_row"] or None, line["note"], variant))
    return rows


def title_and_notes(markdown_path) -> Tuple[str, List[str]]:
    """The title and the ``Note:`` lines (without the paper note every table carries) of a
    committed table, reworded."""
    lines = Path(markdown_path).read_text().splitlines()
    title = _reworded(lines[0][2:])
    notes = [_reworded(line[len("Note: "):]) for line in lines if line.startswith("Note: ")
             and line != f"Note: {PAPER_NOTE}"]
    return title, notes


def rerender_table(out_root, table: str) -> str:
    """Rewrite ``<table>.md`` of a :func:`~ltnet_keras.study.tables.write_table` table."""
    out_root = Path(out_root)
    title, notes = title_and_notes(out_root / f"{table}.md")
    markdown = table_markdown(table, title, rows_from_csvs(out_root, table), notes)
    atomic_write_text(out_root / f"{table}.md", markdown)
    return markdown


def rerender_structure_table(out_root, table: str, paper_rows: Mapping[str, str]) -> str:
    """Rewrite ``<table>.md`` of a
    :func:`~ltnet_keras.study.tables.write_structure_table` table (Table 4)."""
    out_root = Path(out_root)
    title, notes = title_and_notes(out_root / f"{table}.md")
    results = {label: rows for (label, _), rows in
               subject_scores(out_root / f"{table}_subjects.csv").items()}
    markdown = structure_table_markdown(table, title, results, paper_rows, notes)
    atomic_write_text(out_root / f"{table}.md", markdown)
    return markdown
