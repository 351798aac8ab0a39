"""The README's main job (``make demo``): LT-Net as recommended beside what a user would
otherwise run, every row measured in one run on the same validation scans.

Each config is trained (or resumed) in ``out/<name>``; then the validation subjects are
segmented by every run's G_F, by the refined run's G_F + test-time refinement
(:mod:`ltnet_keras.inference.refine`), and by ANTs SyN with the same atlas
(:mod:`ltnet_keras.baselines.syn`). Writes ``demo.md`` / ``demo.csv`` (one row per method:
Dice over merged structures, seconds per case), ``cases.csv`` (per subject), ``demo.json``
(settings, threads, versions) and ``demo.png`` (one validation scan: manual labels, the refined
labels and SyN's side by side).
"""
import datetime
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.baselines.syn import SynSettings, register_atlas
from ltnet_keras.config import ExperimentConfig
from ltnet_keras.data.dataset import subject_files
from ltnet_keras.data.io import load_image, load_label_map, load_subject
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.inference.pictures import label_colours, write_planes_png
from ltnet_keras.inference.refine import RefineSettings
from ltnet_keras.records import (atomic_write_text, csv_text, package_versions,
                                 without_machine_paths)

#: Where the paper preset's demo-scale result is committed, and why it is not trained here.
PAPER_PRESET_NOTE = (
    "The paper's own Eq. (11) weights (preset `ltnet`, lambda_1=10, lambda_2=3, GAN on) are not "
    "trained in the demo: at this CPU scale (32x48x32 grid, 600 steps) they collapse to "
    "52.7 Dice, below no registration (60.5), in the committed run `results/demo_600` "
    "(VoxelMorph 67.3 there). The cycle terms, weighted 10 and 3 against L_sim's 1, pull the "
    "field towards zero before it has learnt to register; the recipe (`experiments/configs/"
    "ltnet_tuned.yaml`, chosen on S31-S40) keeps every term at weights that let L_sim lead. "
    "Tables 1-2 (`experiments/table1_forward_backward.py`, `table2_ablation.py`) train the "
    "paper preset; README \"Why the paper's objective collapses here\".")


@dataclass
class MethodRow:
    """One method of the demo's table: per-case scores, seconds and what it is."""
    name: str
    description: str
    scores: List[evaluation.SubjectScores] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)

    def add(self, subject, labels: np.ndarray, seconds: float, table: LabelTable) -> str:
        """Score one case (``subject``: its SubjectFiles) and keep it; returns its log line."""
        self.seconds.append(seconds)
        self.scores.append(evaluation.evaluate_pair(labels, load_label_map(subject.label).array,
                                                    table, subject.id))
        return (f"  {self.name} {subject.id}: Dice {100 * self.scores[-1].mean_structure:.1f}, "
                f"{seconds:.1f} s")

    def summary(self) -> dict:
        summary = evaluation.summarise(self.scores)
        seconds = np.array(self.seconds, np.float64) if self.seconds else np.zeros(1)
        summary.update({"seconds_per_case": float(seconds.mean()),
                        "first_case_seconds": float(seconds[0]),
                        "later_cases_seconds": float(seconds[1:].mean()) if seconds.size > 1
                        else float(seconds[0])})
        return summary


def use_all_cores() -> int:
    """Give ANTs (ITK) as many threads as TensorFlow takes by default, the machine's cores,
    unless ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set: the comparison is per machine, not
    per thread. Call before ANTs loads; returns ITK's thread count."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(os.cpu_count() or 1))
    return int(os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"])


def segment_rows(run_dir, config: ExperimentConfig, files, table: LabelTable, name: str,
                 description: str, refine: Optional[RefineSettings] = None,
                 log=print) -> tuple:
    """Segment ``files`` with the run's G_F (refined if ``refine``), timing each whole
    :meth:`Segmenter.segment` (read, network, refinement, label warp); returns the row and the
    label maps by subject."""
    from ltnet_keras.inference.segment import Segmenter
    segmenter = Segmenter(run_dir, align="none", refine=refine)
    row, maps = MethodRow(name, description), {}
    for subject in files:
        clock = time.perf_counter()
        result = segmenter.segment(subject.image)
        log(row.add(subject, result.labels, time.perf_counter() - clock, table))
        maps[subject.id] = result.labels
    return row, maps


def syn_rows(atlas_files, files, table: LabelTable, settings: SynSettings,
             log=print) -> tuple:
    """ANTs SyN from the atlas to each scan, labels warped onto the scan's grid; each case
    timed from the loaded volumes to the label map (:func:`register_atlas`)."""
    from ltnet_keras.data.align import load_ants
    load_ants()  # the import is not a registration's time
    atlas_image, atlas_labels = load_subject(atlas_files.image, atlas_files.label, table)
    row = MethodRow("ANTs SyN", settings.describe())
    maps = {}
    for subject in files:
        target = load_image(subject.image)
        warped = register_atlas(atlas_image, atlas_labels, target, settings)
        log(row.add(subject, warped.labels, warped.seconds, table))
        maps[subject.id] = warped.labels
    return row, maps


def format_table(rows: Sequence[MethodRow]) -> str:
    """Markdown: method, Dice mean (std), min, max, mean s/case, first case s, later cases s."""
    lines = ["| Method | Dice mean (std) | min | max | s/case | first case s | later cases s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row.summary()
        lines.append(f"| {row.name} | {s['mean']:.1f} ({s['std']:.1f}) | {s['min']:.1f} | "
                     f"{s['max']:.1f} | {s['seconds_per_case']:.1f} | "
                     f"{s['first_case_seconds']:.1f} | {s['later_cases_seconds']:.1f} |")
    return "\n".join(lines)


@dataclass
class DemoSettings:
    """What the demo runs beside the trainings: ``refine_run`` names the config (its
    ``name``) whose G_F is refined (default: the last one); ``subjects`` (default: the
    configs' validation subjects)."""
    refine: RefineSettings = field(default_factory=RefineSettings)
    syn: SynSettings = field(default_factory=SynSettings)
    refine_run: Optional[str] = None
    subjects: Optional[Sequence[str]] = None


def run_demo(configs: Sequence[ExperimentConfig], out, settings: Optional[DemoSettings] = None,
             verbose: int = 2, log=print) -> List[MethodRow]:
    """Train every config in ``out/<name>``, then score every method on the validation
    subjects and write the table, the per-case CSV, the record and the picture in ``out``."""
    from ltnet_keras.study.experiment import no_registration_scores
    from ltnet_keras.training import train
    settings = settings or DemoSettings()
    itk_threads = use_all_cores()
    out = Path(out)
    clock = time.perf_counter()
    runs = {}
    for config in configs:
        log(f"training {config.name} (preset {config.preset}, {config.train.steps} steps)")
        result = train(config, out / config.name, verbose=verbose)
        runs[config.name] = (config, result.data.atlas.subject)
    train_seconds = time.perf_counter() - clock
    refine_name = settings.refine_run or configs[-1].name
    if refine_name not in runs:
        raise ValueError(f"refine_run {refine_name!r} is none of the configs: {sorted(runs)}")
    atlases = {atlas for _, atlas in runs.values()}
    if len(atlases) != 1:
        raise ValueError(f"the demo compares runs with one atlas; these have {sorted(atlases)}")
    atlas = atlases.pop()
    first = configs[0]
    subjects = list(settings.subjects or first.data.val_subjects)
    table = LabelTable.from_tsv(first.data.resolved_labels_tsv())
    files = subject_files(first.data, subjects)
    atlas_files, = subject_files(first.data, [atlas])

    rows = [MethodRow("no registration", "the atlas' labels as they lie (the data share one "
                      "affine space)", no_registration_scores(first, atlas, subjects),
                      [0.0] * len(subjects))]
    maps = {}
    for name, (config, _) in runs.items():
        kind = "VoxelMorph" if config.preset == "voxelmorph" else "LT-Net"
        log(f"segmenting with {name}'s G_F")
        row, _ = segment_rows(out / name, config, files, table, f"{kind} ({name}), G_F",
                              f"G_F of {name} alone", None, log)
        rows.append(row)
    config, _ = runs[refine_name]
    log(f"segmenting with {refine_name}'s G_F + test-time refinement")
    refined_row, maps["refined"] = segment_rows(
        out / refine_name, config, files, table, f"LT-Net ({refine_name}) + refine",
        f"G_F of {refine_name}, then refinement ({settings.refine.to_dict()})",
        settings.refine, log)
    rows.append(refined_row)
    log(f"ANTs SyN, same atlas {atlas}, ITK threads {itk_threads}")
    syn_row, maps["syn"] = syn_rows(atlas_files, files, table, settings.syn, log)
    rows.append(syn_row)

    _write_records(out, rows, runs, settings, itk_threads, train_seconds, atlas, subjects,
                   first.data.resolved_root())
    dice = np.array([s.mean_structure for s in refined_row.scores])
    typical = files[int(np.argsort(dice)[len(dice) // 2])]   # the median case, not the best
    scan = load_image(typical.image)
    truth = load_label_map(typical.label).array

    def titled(row, labels):
        dice_here = next(s for s in row.scores if s.subject == typical.id).mean_structure
        return f"{row.name}\nDice {100 * dice_here:.1f}", labels
    columns = dict([("scan", None), ("manual labels", truth),
                    titled(refined_row, maps["refined"][typical.id]),
                    titled(syn_row, maps["syn"][typical.id])])
    write_planes_png(out / "demo.png", scan.array, scan.affine, columns,
                     label_colours(table.ids), f"validation scan {typical.id}")
    return rows


def _write_records(out: Path, rows, runs, settings: DemoSettings, itk_threads: int,
                   train_seconds: float, atlas: str, subjects, data_root) -> None:
    import tensorflow as tf
    table = format_table(rows)
    notes = [
        f"Validation subjects {', '.join(subjects)} (LPBA40); atlas {atlas}, chosen by the paper's "
        "rule (closest to the training pool's average); Dice (%) = mean over the merged "
        "structures per subject, then mean (population std) over subjects.",
        "Every row was measured in this run, on this machine, one after another. s/case: the "
        "whole segmentation of one scan, mean over the cases; 'first case' includes this "
        "process' one-off work (tracing TensorFlow graphs; compiling the refinement's XLA "
        "programs unless the on-disk cache, `ltnet cache`, holds them already), "
        "'later cases' is the steady state. TensorFlow uses its default thread pools (all "
        f"cores); ANTs/ITK was given {itk_threads} threads.",
        f"Training ({', '.join(f'{n}: {c.train.steps} steps' for n, (c, _) in runs.items())}) "
        f"took {train_seconds / 60:.1f} min in this run (resumed runs count only what was left).",
        PAPER_PRESET_NOTE]
    text = ("# Demo: LT-Net (recipe) + test-time refinement beside ANTs SyN\n\n" + table
            + "\n\n" + "\n\n".join(notes) + "\n\nPicture: demo.png (manual labels, the refined "
            "labels and SyN's on the median validation scan of the refined row).\n")
    atomic_write_text(out / "demo.md", text)
    columns = ["method", "dice_mean", "dice_std", "dice_min", "dice_max", "n",
               "seconds_per_case", "first_case_seconds", "later_cases_seconds"]
    summaries = [(row, row.summary()) for row in rows]
    atomic_write_text(out / "demo.csv", csv_text(columns, [
        [row.name] + [f"{s[k]:.4f}" if k != "n" else s[k] for k in
                      ("mean", "std", "min", "max", "n", "seconds_per_case",
                       "first_case_seconds", "later_cases_seconds")] for row, s in summaries]))
    atomic_write_text(out / "cases.csv", csv_text(
        ["method", "subject", "dice", "seconds"],
        [[row.name, score.subject, f"{100 * score.mean_structure:.4f}", f"{sec:.4f}"]
         for row in rows for score, sec in zip(row.scores, row.seconds)]))
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "atlas": atlas, "subjects": list(subjects),
        "runs": {name: {"preset": c.preset, "steps": c.train.steps, "seed": c.train.seed,
                        "config": f"{name}/config.yaml"} for name, (c, _) in runs.items()},
        "refine_run": settings.refine_run or list(runs)[-1],
        "refine": settings.refine.to_dict(), "syn": settings.syn.to_dict(),
        "threads": {"tensorflow_intra_op": tf.config.threading.get_intra_op_parallelism_threads()
                    or os.cpu_count(), "itk": itk_threads, "cpu_count": os.cpu_count()},
        "train_seconds": train_seconds, "packages": package_versions(),
        "rows": {row.name: {"description": row.description, **s} for row, s in summaries}}
    repo = Path(__file__).resolve().parents[2]
    atomic_write_text(out / "demo.json", json.dumps(
        without_machine_paths(record, [data_root, repo]), indent=2, default=str))
