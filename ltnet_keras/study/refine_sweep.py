"""Scoring test-time refinement (:mod:`ltnet_keras.inference.refine`) on labelled scans: the
cases (G_F's field and both crops), the refined labels on each scan's own grid, Dice, and the
sweep's records (CSV, Markdown, provenance) for ``experiments/refine_sweep.py`` and
``benchmarks/refine_vs_syn.py``.
"""
import datetime
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.inference.refine import RefineResult, RefineSettings, crop_image
from ltnet_keras.records import (atomic_write_text, csv_text, package_versions,
                                 without_machine_paths)

#: What to run a sweep from (``results/recipe/voxelmorph``: crop 128x192x128, factor 4, S13).
DEFAULT_RUN = "results/recipe/voxelmorph"
VALIDATION_SUBJECTS = tuple(f"S{i}" for i in range(31, 41))


def set_threads(threads: int) -> None:
    """One count for TensorFlow's intra- and inter-op pools and ITK (ANTs): call before
    either starts (before any TensorFlow op, before ``load_ants``)."""
    import os
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass
class Case:
    """One labelled scan ready for refinement: its crop, G_F's network field, the prepared
    target (its ``grid`` maps back) and its manual labels on its own grid."""
    subject: str
    target: object
    target_crop: np.ndarray
    network_field: np.ndarray
    truth: np.ndarray
    network_seconds: float


class CaseMaker:
    """The run's :class:`Segmenter` (G_F, atlas), whose label transfer pulls the atlas labels
    onto each scan's own grid through fields of any factor (Eq. 2)."""

    def __init__(self, run_dir=DEFAULT_RUN):
        from ltnet_keras.inference.segment import Segmenter
        self.segmenter = Segmenter(run_dir, align="none")

    def case(self, image_path, label_path, subject: str) -> Case:
        from ltnet_keras.data.io import load_image, load_label_map
        target = self.segmenter.prepare(image_path)
        clock = time.perf_counter()
        field = np.asarray(self.segmenter.forward_field(target))
        seconds = time.perf_counter() - clock
        target_crop = crop_image(load_image(image_path).array, target.grid)
        return Case(subject, target, target_crop, field, load_label_map(label_path).array,
                    seconds)

    def labels(self, case: Case, field: np.ndarray, factor: int) -> np.ndarray:
        """Atlas labels on the scan's own grid through ``field`` (``(x, y, z, 3)`` at
        ``factor``, in its voxels)."""
        labels, _ = self.segmenter.labels_in_place(case.target.grid,
                                                   np.asarray(field, np.float32), factor)
        return labels.numpy()


def load_cases(maker: CaseMaker, subjects: Sequence[str], data_root) -> List[Case]:
    """:class:`Case` of each subject under ``data_root`` (``images/`` and ``labels/``)."""
    from ltnet_keras.data.io import find_subjects
    found = find_subjects(data_root)
    missing = [s for s in subjects if s not in found or found[s].label is None]
    if missing:
        raise ValueError(f"subjects {missing} have no image and label map under {data_root}")
    return [maker.case(found[s].image, found[s].label, s) for s in subjects]


def score(labels: np.ndarray, truth: np.ndarray, table) -> float:
    """The project's per-subject Dice (%): mean over merged left/right structures."""
    return 100.0 * evaluation.evaluate_pair(labels, truth, table).mean_structure


def run_case(maker: CaseMaker, case: Case, settings: Optional[RefineSettings], table) -> dict:
    """Refine one case (``settings`` None: G_F alone) and score it; seconds split into the
    network, the refinement and the label warp."""
    refined: Optional[RefineResult] = None
    if settings is None:
        field, factor = case.network_field, case.target.grid.factor
    else:
        refined = maker.segmenter.refine_crop(case.network_field, case.target_crop, settings)
        field, factor = refined.field, refined.factor
    clock = time.perf_counter()
    labels = maker.labels(case, field, factor)
    warp_seconds = time.perf_counter() - clock
    row = {"subject": case.subject, "dice": score(labels, case.truth, table),
           "network_s": case.network_seconds, "warp_s": warp_seconds,
           "refine_s": 0.0 if refined is None else refined.seconds}
    row["total_s"] = row["network_s"] + row["refine_s"] + row["warp_s"]
    if refined is None:   # G_F's own field, on the network grid
        from ltnet_keras.inference.refine import folding_fraction
        row["folding_percent"] = 100.0 * folding_fraction(case.network_field)
    else:
        row.update({"loss_start": float(refined.loss_history[0][0])
                    if len(refined.loss_history[0]) else refined.final_loss,
                    "loss_end": refined.final_loss,
                    "folding_percent": 100.0 * refined.folding_fraction,
                    "inverse_consistency_mm": refined.inverse_consistency_mm,
                    "steps": "+".join(map(str, refined.steps_per_level)),
                    "level_s": "+".join(f"{s:.2f}" for s in refined.seconds_per_level),
                    "step_ms": "+".join(f"{1000 * s / max(k, 1):.1f}" for s, k in zip(
                        refined.seconds_per_level, refined.steps_per_level))})
    return row


def warm_up(maker: CaseMaker, case: Case, settings: Optional[RefineSettings], table) -> float:
    """One untimed run (compiles every level for this shape); returns its seconds."""
    clock = time.perf_counter()
    run_case(maker, case, settings, table)
    return time.perf_counter() - clock


def setting_name(settings: Optional[RefineSettings]) -> str:
    """A short, unique-enough label of a setting for tables."""
    if settings is None:
        return "G_F alone"
    levels = ",".join(f"{f}mm:{s}" for f, s in settings.levels)
    name = (f"{levels} lr{settings.learning_rate:g} w{settings.regularizer_weight:g} "
            f"ncc{settings.ncc_window:g} sm{settings.smoothing_passes}")
    if settings.diffeomorphic:
        name += f" diffeo{settings.integration_steps}"
    if settings.tolerance:
        name += f" tol{settings.tolerance:g}/{settings.patience}"
    return name


SUMMARY_COLUMNS = ("setting", "n", "dice_mean", "dice_std", "dice_min", "refine_s", "total_s",
                   "folding_percent", "status")


def summarise_rows(name: str, settings: Optional[RefineSettings], rows: List[dict],
                   status: str = "ok") -> dict:
    """One line of the sweep: mean (std, min) Dice and mean seconds over the cases."""
    dice = np.array([r["dice"] for r in rows]) if rows else np.array([np.nan])
    mean = (lambda key: float(np.mean([r.get(key, 0.0) for r in rows])) if rows else np.nan)
    return {"setting": name, "n": len(rows), "dice_mean": float(dice.mean()),
            "dice_std": float(dice.std()), "dice_min": float(dice.min()),
            "refine_s": mean("refine_s"), "total_s": mean("total_s"),
            "folding_percent": mean("folding_percent"), "status": status,
            "settings": None if settings is None else settings.to_dict()}


def write_records(out_dir, summaries: List[dict], case_rows: List[dict], extra: dict,
                  data_root, title: str) -> None:
    """``summary.csv``, ``cases.csv``, ``summary.md`` and ``provenance.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else v)
    atomic_write_text(out_dir / "summary.csv", csv_text(
        SUMMARY_COLUMNS + ("settings",),
        [[fmt(s[c]) for c in SUMMARY_COLUMNS] + [json.dumps(s["settings"])] for s in summaries]))
    keys = list(dict.fromkeys(k for r in case_rows for k in r))
    atomic_write_text(out_dir / "cases.csv", csv_text(
        keys, [[fmt(r.get(k, "")) for k in keys] for r in case_rows]))
    lines = [f"# {title}", "", "| Setting | n | Dice mean (std) | min | refine s/case | "
             "total s/case | folding % | status |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['setting']} | {s['n']} | {s['dice_mean']:.2f} ({s['dice_std']:.2f})"
                     f" | {s['dice_min']:.2f} | {s['refine_s']:.2f} | {s['total_s']:.2f} | "
                     f"{s['folding_percent']:.4f} | {s['status']} |")
    atomic_write_text(out_dir / "summary.md", "\n".join(lines + [""] + extra.get("notes", []))
                      + "\n")
    repo = Path(__file__).resolve().parents[2]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
              "git_commit": git("rev-parse", "HEAD"),
              "git_dirty": bool(git("status", "--porcelain")),
              "packages": package_versions(), "platform": platform.platform(),
              "settings": {s["setting"]: s["settings"] for s in summaries}}
    record.update({k: v for k, v in extra.items() if k != "notes"})
    record = without_machine_paths(record, [data_root, repo])
    atomic_write_text(out_dir / "provenance.json", json.dumps(record, indent=2, default=str))


def run_settings(maker: CaseMaker, cases: List[Case], named: Dict[str, Optional[RefineSettings]],
                 table, log=print, after_each=None) -> tuple:
    """Every setting on every case (a failing setting is kept with its error as status);
    returns (summaries, case rows). ``after_each(summaries, rows)`` runs after each setting
    (to write the records so far)."""
    summaries, all_rows = [], []
    for name, settings in named.items():
        rows, status = [], "ok"
        try:
            compile_s = warm_up(maker, cases[0], settings, table)
            for case in cases:
                row = run_case(maker, case, settings, table)
                row["setting"] = name
                rows.append(row)
                log(f"  {name} {case.subject}: Dice {row['dice']:.2f} refine {row['refine_s']:.2f}"
                    f" s ({row.get('step_ms', '')} ms/step) total {row['total_s']:.2f} s")
        except Exception as error:  # a failing setting is a result too
            status = f"failed: {type(error).__name__}: {error}"[:200]
            compile_s = float("nan")
        summary = summarise_rows(name, settings, rows, status)
        summary["warm_up_s"] = compile_s
        log(f"{name}: Dice {summary['dice_mean']:.2f} ({summary['dice_std']:.2f}) "
            f"refine {summary['refine_s']:.2f} s/case, {status}")
        summaries.append(summary)
        all_rows.extend(rows)
        if after_each is not None:
            after_each(summaries, all_rows)
    return summaries, all_rows
