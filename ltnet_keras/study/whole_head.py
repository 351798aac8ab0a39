"""From a raw T1 to volumes, measured: each FreeSurfer validation subject segmented from its
whole-head ``T1.mgz`` (skull detected, brain extracted with the other subjects' heads as
templates: leave-one-out by construction) and from its skull-stripped ``brainmask.mgz``, both
with refinement, scored against its ``aseg.mgz``: Dice over the merged structures, the brain
mask's Dice against FreeSurfer's, and each label's volume against the truth's.
"""
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ltnet_keras.data.grids import voxel_sizes
from ltnet_keras.data.io import load_image, load_label_map
from ltnet_keras.data.skull import mask_dice
from ltnet_keras.inference.volumes import label_volumes, volume_errors
from ltnet_keras.records import atomic_write_text, csv_text, package_versions, shown_path
from ltnet_keras.study.refine_sweep import score

INPUTS = ("T1.mgz", "brainmask.mgz")


def measure_whole_head(run_dir, subjects: Sequence[str], out_dir, refine_levels=None,
                       log=print) -> dict:
    """Segment ``T1.mgz`` and ``brainmask.mgz`` of each subject folder of the run's data root;
    writes ``cases.csv``, ``summary.md``, ``provenance.json`` in ``out_dir``; returns the
    summary."""
    from ltnet_keras.inference.refine import RefineSettings
    from ltnet_keras.inference.segment import Segmenter
    refine = RefineSettings(levels=refine_levels) if refine_levels else RefineSettings()
    segmenter = Segmenter(run_dir, refine=refine)
    root = segmenter.config.data.resolved_root()
    protocol = segmenter.protocol
    rows = []
    for subject in subjects:
        folder = Path(root) / subject
        truth = load_label_map(folder / "aseg.mgz")
        truth_volumes = label_volumes(truth.array, voxel_sizes(truth.affine), protocol)
        for name in INPUTS:
            clock = time.perf_counter()
            result = segmenter.segment(folder / name)
            seconds = time.perf_counter() - clock
            errors = volume_errors(label_volumes(result.labels, voxel_sizes(result.affine),
                                                 protocol), truth_volumes, protocol.names)
            row = {"subject": subject, "input": name,
                   "dice": score(result.labels, truth.array, protocol),
                   "volume_error_percent": 100 * float(np.mean(list(errors.values()))),
                   "seconds": seconds, "skull_detected": result.brain is not None}
            if result.brain is not None:
                reference = load_image(folder / "brainmask.mgz").array > 0
                row["brain_mask_dice"] = 100 * mask_dice(result.brain.mask, reference)
                row["templates"] = " ".join(result.brain.templates)
                row["brain_extraction_s"] = result.brain.seconds["brain_extraction"]
            rows.append(row)
            log(f"  {subject} {name}: Dice {row['dice']:.1f}, volume error "
                f"{row['volume_error_percent']:.1f} %, {seconds:.1f} s"
                + (f", brain mask Dice {row['brain_mask_dice']:.1f}" if "brain_mask_dice" in row
                   else ""))
    summary = _summary(rows)
    _write(out_dir, rows, summary, run_dir, subjects, refine)
    return summary


def _mean(rows, key, input_name: Optional[str] = None):
    values = [r[key] for r in rows if key in r and (input_name is None or r["input"] == input_name)]
    return float(np.mean(values)) if values else float("nan")


def _summary(rows) -> dict:
    summary = {}
    for name in INPUTS:
        summary[name] = {key: _mean(rows, key, name) for key in
                         ("dice", "volume_error_percent", "seconds", "brain_mask_dice")}
    summary["dice_gap"] = summary["brainmask.mgz"]["dice"] - summary["T1.mgz"]["dice"]
    return summary


def _write(out_dir, rows, summary, run_dir, subjects, refine) -> None:
    out_dir = Path(out_dir)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = (lambda v: f"{v:.3f}" if isinstance(v, float) else v)
    atomic_write_text(out_dir / "cases.csv", csv_text(keys, [[fmt(r.get(k, "")) for k in keys]
                                                              for r in rows]))
    t1, brain = summary["T1.mgz"], summary["brainmask.mgz"]
    lines = [f"# From a raw T1: {shown_path(run_dir)} on {', '.join(subjects)}", "",
             "| input | Dice (28 labels, merged) | volume error % (mean over labels) | "
             "brain mask Dice | s/case |", "|---|---|---|---|---|",
             f"| whole head `T1.mgz` (skull found and removed) | {t1['dice']:.1f} | "
             f"{t1['volume_error_percent']:.1f} | {t1['brain_mask_dice']:.1f} | "
             f"{t1['seconds']:.1f} |",
             f"| skull-stripped `brainmask.mgz` | {brain['dice']:.1f} | "
             f"{brain['volume_error_percent']:.1f} | - | {brain['seconds']:.1f} |", "",
             f"Dice gap brainmask - T1: {summary['dice_gap']:.2f} points. Head templates: the "
             "other subjects' T1.mgz + brainmask.mgz (never the subject's own). Volume error: "
             "|predicted - truth| / truth per label of the protocol (truth: aseg.mgz), mean over "
             "labels and subjects. Refinement on; `ltnet segment` defaults otherwise."]
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "provenance.json", json.dumps({
        "run": shown_path(run_dir), "subjects": list(subjects), "refine": refine.to_dict(),
        "packages": package_versions(), "summary": summary}, indent=2, default=str))
