"""Table 4 on the paper's own label protocol: FreeSurfer's 28 aseg labels merged into the 16
structures of the paper's Table 4, with a FreeSurfer subject as the one labelled atlas.

Every subject of a FreeSurfer collection lies in its own conformed space, so each method meets
each validation subject through an affine alignment (ANTs) and is scored on the subject's own
256^3 grid against its aseg (ids outside the protocol: background). Rows:

* ``no_registration``: the atlas' aseg laid on the subject's voxel grid as it is (conformed
  grids have the same shape, not the same anatomy at a voxel: the floor);
* ``affine``: the atlas' labels moved by the affine alignment only;
* ``syn``: ANTs affine + SyN of the atlas to the subject (:mod:`ltnet_keras.baselines.syn`);
* one row per trained run (G_F after the alignment), and ``<run> + refine`` (test-time
  refinement of its field, :mod:`ltnet_keras.inference.refine`).

Seconds per case are wall times of each method on this machine, in one process, one thread.
"""
import csv
import io
import json
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.config import ExperimentConfig
from ltnet_keras.data.dataset import subject_files
from ltnet_keras.data.io import find_subjects, load_subject
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.records import atomic_write_text, shown_path
from ltnet_keras.study.tables import PAPER_TABLE4

ATLAS_CHOICE = "atlas_choice.json"


def choose_atlas(data_root, out_dir) -> str:
    """The paper's rule among the labelled subjects of ``data_root``: the one closest to their
    average once all are aligned affinely (:func:`select_atlas_aligned`); the scores go to
    ``out_dir/atlas_choice.json`` and are read back from there next time."""
    from ltnet_keras.data.atlas import select_atlas_aligned
    path = Path(out_dir) / ATLAS_CHOICE
    if path.exists():
        return json.loads(path.read_text())["atlas"]
    subjects = {sid: f.image for sid, f in find_subjects(data_root).items() if f.label}
    clock = time.perf_counter()
    choice = select_atlas_aligned(subjects)
    atomic_write_text(path, json.dumps({
        "atlas": choice.subject, "measure": "ncc with the average of the affinely aligned "
        "subjects (select_atlas_aligned, 2 passes)", "scores": choice.scores,
        "data_root": shown_path(data_root), "seconds": time.perf_counter() - clock}, indent=2))
    return choice.subject


class Timed:
    """Per-case scores and seconds of one row."""

    def __init__(self):
        self.scores: List[evaluation.SubjectScores] = []
        self.seconds: List[float] = []

    def add(self, scores: evaluation.SubjectScores, seconds: float) -> None:
        self.scores.append(scores)
        self.seconds.append(float(seconds))


def classical_rows(config: ExperimentConfig, cache_dir, syn_settings=None) -> Dict[str, Timed]:
    """``no_registration``, ``affine`` and ``syn`` for every validation subject of ``config``."""
    from ltnet_keras.baselines.syn import register_atlas
    from ltnet_keras.data.align import AlignmentCache, resample
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    atlas_files, = subject_files(config.data, [config.data.atlas])
    atlas_image, atlas_labels = load_subject(atlas_files.image, atlas_files.label, table)
    cache = AlignmentCache(cache_dir)
    rows = {name: Timed() for name in ("no_registration", "affine", "syn")}
    for files in subject_files(config.data, config.data.val_subjects):
        scan, truth = load_subject(files.image, files.label, table)
        if scan.shape == atlas_labels.shape:
            rows["no_registration"].add(
                evaluation.evaluate_pair(atlas_labels.array, truth.array, table, files.id), 0.0)
        clock = time.perf_counter()
        alignment = cache.alignment(scan, atlas_image)
        moved = resample(atlas_labels.array, alignment.scan_voxel_to_atlas_voxel, scan.shape,
                         "label")
        rows["affine"].add(evaluation.evaluate_pair(moved, truth.array, table, files.id),
                           time.perf_counter() - clock)
        warped = register_atlas(atlas_image, atlas_labels, scan, syn_settings)
        rows["syn"].add(evaluation.evaluate_pair(warped.labels, truth.array, table, files.id),
                        warped.seconds)
    return rows


def learned_rows(run_dir, config: ExperimentConfig, label: str, refine=None,
                 out_dir=None) -> Dict[str, Timed]:
    """``label`` (G_F after the affine alignment) and, with ``refine`` (RefineSettings),
    ``label + refine`` for every validation subject; label maps are written under ``out_dir``.
    Alignments are the run's own (kept in its ``aligned/``), so both rows share them."""
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.training import ALIGNED_DIR
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    cache = Path(run_dir) / ALIGNED_DIR
    variants = {label: None, **({f"{label} + refine": refine} if refine is not None else {})}
    rows = {}
    for name, settings in variants.items():
        segmenter = Segmenter(run_dir, alignment_cache=cache, refine=settings)
        rows[name] = Timed()
        folder = Path(out_dir or Path(run_dir) / "segmentations") / name.replace(" + ", "_")
        for files in subject_files(config.data, config.data.val_subjects):
            result = segmenter.segment_to_files(files.image, folder)
            _, truth = load_subject(files.image, files.label, table)
            scores = evaluation.evaluate_pair(result.labels, truth.array, table, files.id)
            scores.deformation = evaluation.folding_stats(result.network_field)
            # Alignment is paid once per scan whatever the method: count it in every row.
            rows[name].add(scores, sum(v for k, v in result.seconds.items() if k != "write"))
    return rows


def _cell(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    return f"{100 * np.mean(values):.1f}" + (f" ({100 * np.std(values):.1f})"
                                              if len(values) > 1 else "")


def protocol_markdown(rows: Mapping[str, Timed], labels: Mapping[str, str], title: str,
                      notes: Sequence[str] = ()) -> str:
    """The paper's Table 4 layout (methods down, its 16 structures across), our rows then the
    paper's, plus the mean over the 28 labels and seconds per case for ours."""
    structures = PAPER_TABLE4["structures"]
    head = ["Method", *structures, "Mean, 28 labels", "s / case"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, timed in rows.items():
        cells = [_cell([s.structures.get(name, np.nan) for s in timed.scores])
                 for name in structures]
        mean = _cell([s.mean_label for s in timed.scores])
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(cells)
                     + f" | **{mean}** | {np.mean(timed.seconds):.1f} |")
    for name, values in PAPER_TABLE4["rows"].items():
        lines.append(f"| paper (CANDI): {name} | " + " | ".join(f"{v:.1f}" for v in values)
                     + " | - | - |")
    lines += ["", "Ours: mean (std) Dice (%) over the validation subjects; the paper's: mean over "
              "its CANDI test scans."] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def protocol_csv(rows: Mapping[str, Timed], labels: Mapping[str, str]) -> str:
    """One line per (method, subject): seconds, mean over the labels, each structure. Quoted
    by the csv module: method names hold commas ("ANTs SyN, 1 atlas")."""
    structures = PAPER_TABLE4["structures"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["method", "subject", "seconds", "mean_label", *structures])
    for key, timed in rows.items():
        for scores, seconds in zip(timed.scores, timed.seconds):
            writer.writerow([labels.get(key, key), scores.subject, f"{seconds:.2f}",
                             f"{scores.mean_label:.6f}"]
                            + [f"{scores.structures.get(s, np.nan):.6f}" for s in structures])
    return text.getvalue()


def write_protocol_table(out_dir, rows: Mapping[str, Timed], labels: Mapping[str, str],
                         title: str, notes: Sequence[str] = (),
                         extra: Optional[dict] = None) -> str:
    """``table4_freesurfer.md`` / ``.csv`` and ``scores.json`` (every per-label Dice) in
    ``out_dir``; returns the Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = protocol_markdown(rows, labels, title, notes)
    atomic_write_text(out_dir / "table4_freesurfer.md", markdown)
    atomic_write_text(out_dir / "table4_freesurfer.csv", protocol_csv(rows, labels))
    detail = {labels.get(k, k): [{"subject": s.subject, "seconds": t,
                                  "labels": {str(i): d for i, d in s.labels.items()},
                                  "deformation": s.deformation}
                                 for s, t in zip(timed.scores, timed.seconds)]
              for k, timed in rows.items()}
    atomic_write_text(out_dir / "scores.json", json.dumps({**(extra or {}), "rows": detail},
                                                          indent=1, default=float))
    return markdown
