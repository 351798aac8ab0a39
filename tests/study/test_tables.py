"""ltnet_keras.study.tables: the paper-format rows, the per-subject CSV, the box plot, provenance;
ltnet_keras.study.rerender: a table's Markdown rebuilt from its own CSVs."""
import csv
import io
import json

import pytest

from ltnet_keras.config import ExperimentConfig
from ltnet_keras.evaluation import SubjectScores
from ltnet_keras.study.rerender import rerender_structure_table, rerender_table
from ltnet_keras.study.tables import (PAPER_REFERENCE, Row, format_markdown_table, paper_format,
                                plot_boxes, subjects_csv_text, write_provenance,
                                write_structure_table, write_table)


def _subject(name, a, b, folding=None):
    """Two merged structures with Dice ``a`` and ``b``: the subject's mean is (a + b) / 2."""
    deformation = {} if folding is None else {"folding_percent": folding,
                                              "log_jacobian_std": 0.5}
    return SubjectScores(name, labels={1: a, 2: b}, structures={"caudate": a, "putamen": b},
                         deformation=deformation)


# Subject means 70, 80 and 90 %: mean 80, population std sqrt(200 / 3) = 8.165, min 70, max 90.
THREE = [_subject("S31", 0.6, 0.8), _subject("S32", 0.8, 0.8), _subject("S33", 0.9, 0.9)]
# Subject means 50 and 60 %: mean 55, std 5.
TWO = [_subject("S31", 0.5, 0.5, folding=1.25), _subject("S32", 0.6, 0.6, folding=0.75)]


def _table_lines(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| ")]


def test_paper_format_of_three_subjects():
    assert paper_format(Row("VoxelMorph", THREE).summary) == ("80.0 (8.2)", "70.0", "90.0")
    assert paper_format(Row("x", TWO).summary) == ("55.0 (5.0)", "50.0", "60.0")
    assert paper_format(None) == ("—", "—", "—")


def test_markdown_row_beside_the_papers_row():
    rows = [Row("VoxelMorph", THREE, "VoxelMorph"),
            Row("DataAug", None, "DataAug", note="not reproduced")]
    header, ours, missing = _table_lines(format_markdown_table(rows,
                                                                  PAPER_REFERENCE["table5"]))
    assert header.startswith("| Method | Mean (std) | Min | Max | n |")
    assert ours == ("| VoxelMorph | 80.0 (8.2) | 70.0 | 90.0 | 3 | VoxelMorph | 76.0 (9.7) | "
                    "61.7 | 80.1 |")
    assert missing == ("| DataAug | not reproduced | — | — | — | DataAug | 80.4 (4.3) | 73.8 | "
                       "84.0 |")


def test_markdown_with_two_weight_sets_side_by_side():
    rows = [Row("floor", TWO),
            Row("+ L_GAN", THREE, "+ L_GAN", variant="paper weights"),
            Row("+ L_GAN", TWO, "+ L_GAN", variant="recipe weights")]
    header, floor, gan = _table_lines(format_markdown_table(rows, PAPER_REFERENCE["table1"]))
    assert header.startswith("| Method | paper weights: Mean (std) | Min | Max | "
                             "recipe weights: Mean (std) | Min | Max | n |")
    # A row without a weight set (the floor) fills both blocks.
    assert floor == ("| floor | 55.0 (5.0) | 50.0 | 60.0 | 55.0 (5.0) | 50.0 | 60.0 | 2 | "
                     "— | — | — | — |")
    assert gan == ("| + L_GAN | 80.0 (8.2) | 70.0 | 90.0 | 55.0 (5.0) | 50.0 | 60.0 | 3/2 | "
                   "+ L_GAN | 79.0 (3.1) | 72.7 | 81.9 |")


def test_subjects_csv_content():
    rows = [Row("VoxelMorph", THREE), Row("LT-Net", TWO, variant="recipe weights"),
            Row("U-Net", None, note="not reproduced")]
    records = list(csv.DictReader(io.StringIO(subjects_csv_text(rows))))
    assert [(r["row"], r["variant"], r["subject"]) for r in records] == [
        ("VoxelMorph", "", "S31"), ("VoxelMorph", "", "S32"), ("VoxelMorph", "", "S33"),
        ("LT-Net", "recipe weights", "S31"), ("LT-Net", "recipe weights", "S32")]
    assert [float(r["mean_dice"]) for r in records] == [70.0, 80.0, 90.0, 50.0, 60.0]
    assert float(records[0]["dice_caudate"]) == 60.0 and float(records[0]["dice_putamen"]) == 80.0
    # Folding only where the subject's field was scored.
    assert records[0]["folding_percent"] == "" and float(records[3]["folding_percent"]) == 1.25


def test_box_plot_is_a_png_with_one_box_per_scored_row(tmp_path):
    from matplotlib.image import imread
    rows = [Row("floor", TWO), Row("VoxelMorph", THREE), Row("U-Net", None),
            Row("+ L_GAN", THREE, variant="paper weights"),
            Row("+ L_GAN", TWO, variant="recipe weights")]
    names = plot_boxes(rows, tmp_path / "four.png")
    assert names == ["floor", "VoxelMorph", "+ L_GAN [paper weights]", "+ L_GAN [recipe weights]"]
    assert (tmp_path / "four.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_boxes(rows[:1], tmp_path / "one.png") == ["floor"]
    # The figure grows with the number of boxes.
    assert imread(tmp_path / "four.png").shape[0] > imread(tmp_path / "one.png").shape[0]
    with pytest.raises(ValueError, match="no row has scores"):
        plot_boxes([Row("U-Net", None)], tmp_path / "none.png")


def test_write_table_writes_every_file(tmp_path):
    rows = [Row("VoxelMorph", THREE, "VoxelMorph"), Row("LT-Net", TWO, "LT-Net")]
    markdown = write_table(tmp_path, "table5", "Table 5", rows, notes=["a note"])
    assert (tmp_path / "table5.md").read_text() == markdown
    assert "| VoxelMorph | 80.0 (8.2) | 70.0 | 90.0 | 3 |" in markdown
    assert "Note: a note" in markdown
    summary = list(csv.DictReader(open(tmp_path / "table5.csv")))
    assert [(r["method"], r["mean"], r["paper_mean"]) for r in summary] == [
        ("VoxelMorph", "80.0000", "76.0"), ("LT-Net", "55.0000", "82.3")]
    assert len(list(csv.DictReader(open(tmp_path / "table5_subjects.csv")))) == 5
    assert (tmp_path / "table5.png").read_bytes()[:4] == b"\x89PNG"


def test_structure_table_writes_subjects_and_box_plot(tmp_path):
    markdown = write_structure_table(tmp_path, "table4", "Table 4",
                                     {"VoxelMorph": THREE, "LT-Net": TWO},
                                     {"VoxelMorph": "VoxelMorph", "LT-Net": "LT-Net"})
    # Caudate: ours 76.7 beside the paper's CANDI caudate 79.6 for VoxelMorph.
    assert "| caudate / Caudate | 76.7 | 79.6 | 55.0 | 85.5 |" in markdown
    assert len(list(csv.DictReader(open(tmp_path / "table4_subjects.csv")))) == 5
    assert (tmp_path / "table4.png").exists()


def test_provenance_records_configs_seeds_and_versions(tmp_path):
    config = ExperimentConfig()
    config.train.seed = 7
    path = write_provenance(tmp_path, "table1", {"gan": config}, {"train.steps": 10},
                            {"run_dirs": {"gan": "runs/x"}})
    record = json.loads(path.read_text())
    assert record["seeds"] == {"gan": 7} and record["overrides"] == {"train.steps": 10}
    assert record["configs"]["gan"]["weights"]["cyc"] == 10.0
    assert record["run_dirs"] == {"gan": "runs/x"} and record["packages"]["numpy"]
    assert len(record["git_commit"] or "") == 40


# ----------------------------------------------------------------------------- re-rendering

def test_rerendered_table_is_what_the_writer_wrote(tmp_path):
    rows = [Row("floor", TWO, note="floor: affine only"),
            Row("+ L_GAN", THREE, "+ L_GAN", variant="paper weights"),
            Row("+ L_GAN", TWO, "+ L_GAN", variant="recipe weights")]
    written = write_table(tmp_path, "table1", "Table 1 — 3 held-out subjects", rows,
                          ["one note on the held-out subjects"])
    again = rerender_table(tmp_path, "table1")
    assert again == written.replace("held-out", "validation")
    assert "| + L_GAN | 80.0 (8.2) | 70.0 | 90.0 | 55.0 (5.0) | 50.0 | 60.0 | 3/2 |" in again
    assert (tmp_path / "table1.md").read_text() == again


def test_rerendered_structure_table_is_what_the_writer_wrote(tmp_path):
    results = {"VoxelMorph": THREE, "LT-Net (recipe)": TWO}
    paper_rows = {"VoxelMorph": "VoxelMorph", "LT-Net (recipe)": "LT-Net"}
    written = write_structure_table(tmp_path, "table4", "Table 4", results, paper_rows,
                                    ["a note"])
    assert rerender_structure_table(tmp_path, "table4", paper_rows) == written
