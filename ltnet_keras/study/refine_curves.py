"""Where LT-Net pays at test time (issue 26): Dice against refinement seconds for each start
(the identity, VoxelMorph's G_F, LT-Net's G_F and G_B) and objective (``plain``, ``ltnet``) at
budgets from a few steps to convergence, and the ablation of the test-time terms.

Each case is a whole :meth:`Segmenter.segment` of a validation subject (alignment, network,
refinement, labels carried to the scan's own grid), scored with the project's Dice (mean over
merged structures, :func:`refine_sweep.score`) and the per-label mean. Rows are appended to
``cases.csv`` as they are measured, so an interrupted run resumes where it stopped.
"""
import csv
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.inference.refine import RefineSettings

#: Budgets: the default levels' steps times these (0: the start's own field, no refinement).
DEFAULT_SCALES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
CASE_COLUMNS = ("dataset", "run", "setting", "start", "objective", "scale", "subject",
                "dice", "dice_label", "refine_s", "segment_s", "inverse_consistency_mm",
                "folding_percent")


def scaled(settings: RefineSettings, scale: float) -> RefineSettings:
    """``settings`` with every level's steps times ``scale`` (at least 1 step per level)."""
    return replace(settings, levels=tuple((f, max(1, int(round(s * scale))))
                                          for f, s in settings.levels))


def curve_settings(starts: Sequence[str], objectives: Sequence[str],
                   scales: Sequence[float] = DEFAULT_SCALES,
                   base: Optional[RefineSettings] = None) -> Dict[str, Optional[RefineSettings]]:
    """Named settings of the curves: ``start/objective/xSCALE``; scale 0 is no refinement:
    G_F's field for the network start (``None``), the identity for the zero start (0 steps)."""
    base = base or RefineSettings()
    named = {}
    for start in starts:
        for objective in objectives:
            for scale in scales:
                name = f"{start}/{objective}/x{scale:g}"
                settings = replace(base, start=start, objective=objective)
                if scale == 0:
                    settings = (None if start == "network"
                                else replace(settings, levels=((base.levels[0][0], 0),)))
                else:
                    settings = scaled(settings, scale)
                named[name] = settings
    return named


def ablation_settings(base: RefineSettings) -> Dict[str, RefineSettings]:
    """``base`` (an ``ltnet`` objective with every term on) and one row per term switched off,
    as Table 2 switches off the training terms."""
    named = {"all terms": base}
    for term, weight in base.cycle.to_dict().items():
        if weight:
            named[f"without {term}"] = replace(base, cycle=base.cycle.without(term))
    return named


def _done(path: Path) -> set:
    if not path.exists():
        return set()
    with open(path) as handle:
        return {(r["run"], r["setting"], r["subject"]) for r in csv.DictReader(handle)}


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, CASE_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def run_cases(run_dir, named: Dict[str, Optional[RefineSettings]], out_dir, run_label: str,
              subjects: Optional[Sequence[str]] = None, alignment_cache=None,
              log: Callable[[str], None] = print) -> None:
    """Segment the run's validation subjects (or ``subjects``) with each named setting and
    append a row per case to ``out_dir/cases.csv``; cases already there are skipped. One
    untimed warm-up case per setting compiles it first."""
    from ltnet_keras.config import load_config
    from ltnet_keras.data.dataset import subject_files
    from ltnet_keras.data.io import load_subject
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.refine import folding_fraction
    from ltnet_keras.inference.segment import Segmenter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases_csv = out_dir / "cases.csv"
    config = load_config(Path(run_dir) / "config.yaml")
    files = subject_files(config.data, list(subjects or config.data.val_subjects))
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    dataset = Path(config.data.resolved_root()).name
    # One segmenter for every setting: each swaps in its own refinement.
    segmenter = Segmenter(run_dir, alignment_cache=alignment_cache, refine=RefineSettings())
    truths = {}
    for name, settings in named.items():
        todo = [f for f in files if (run_label, name, f.id) not in _done(cases_csv)]
        if not todo:
            continue
        segmenter.refine = settings
        segmenter.segment(todo[0].image)                    # compiles this setting's levels
        for subject in todo:
            if subject.id not in truths:
                truths[subject.id] = load_subject(subject.image, subject.label, table)[1].array
            clock = time.perf_counter()
            result = segmenter.segment(subject.image)
            seconds = time.perf_counter() - clock
            # The project's Dice (refine_sweep.score) and the per-label mean, from one count.
            scores = evaluation.evaluate_pair(result.labels, truths[subject.id], table)
            refined = result.refinement
            row = {"dataset": dataset, "run": run_label, "setting": name,
                   "start": "network" if settings is None else settings.start,
                   "objective": "none" if settings is None else settings.objective,
                   "scale": name.rsplit("/x", 1)[-1] if "/x" in name else "",
                   "subject": subject.id, "dice": 100.0 * scores.mean_structure,
                   "dice_label": 100.0 * scores.mean_label,
                   "refine_s": 0.0 if refined is None else refined.seconds,
                   "segment_s": seconds,
                   "inverse_consistency_mm": (np.nan if refined is None
                                              or refined.inverse_consistency_mm is None
                                              else refined.inverse_consistency_mm),
                   "folding_percent": 100.0 * (refined.folding_fraction if refined is not None
                                               else folding_fraction(result.network_field))}
            _append(cases_csv, row)
            log(f"{run_label} {name} {subject.id}: Dice {row['dice']:.2f} refine "
                f"{row['refine_s']:.2f} s")


def read_cases(out_dir) -> List[dict]:
    with open(Path(out_dir) / "cases.csv") as handle:
        return list(csv.DictReader(handle))


def summarise(rows: List[dict]) -> List[dict]:
    """Per (dataset, run, setting): n, mean/std Dice, mean per-label Dice, seconds, inverse
    consistency and folding, in the order first seen."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["run"], r["setting"]), []).append(r)
    out = []
    for (dataset, run, setting), members in groups.items():
        values = {k: np.array([float(m[k]) if m[k] not in ("", "nan") else np.nan
                               for m in members]) for k in
                  ("dice", "dice_label", "refine_s", "segment_s", "inverse_consistency_mm",
                   "folding_percent")}
        out.append({"dataset": dataset, "run": run, "setting": setting, "n": len(members),
                    "start": members[0]["start"], "objective": members[0]["objective"],
                    "scale": members[0]["scale"], "dice": values["dice"].mean(),
                    "dice_std": values["dice"].std(), "dice_label": values["dice_label"].mean(),
                    "refine_s": values["refine_s"].mean(), "segment_s": values["segment_s"].mean(),
                    "inverse_consistency_mm": np.nanmean(values["inverse_consistency_mm"])
                    if np.isfinite(values["inverse_consistency_mm"]).any() else np.nan,
                    "folding_percent": values["folding_percent"].mean(),
                    "subjects": [m["subject"] for m in members],
                    "per_subject": values["dice"]})
    return out


def summary_markdown(summaries: List[dict], title: str, notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", "| dataset | G_F of | setting | n | Dice (std) | per-label Dice | "
             "refine s | segment s | inverse consistency mm | folding % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['dataset']} | {s['run']} | {s['setting']} | {s['n']} | "
                     f"{s['dice']:.2f} ({s['dice_std']:.2f}) | {s['dice_label']:.2f} | "
                     f"{s['refine_s']:.2f} | {s['segment_s']:.2f} | "
                     f"{s['inverse_consistency_mm']:.3f} | {s['folding_percent']:.3f} |")
    return "\n".join(lines + [""] + list(notes)) + "\n"


def plot_curves(summaries: List[dict], path) -> None:
    """Dice against the budget (top: the default levels' steps times the scale) and against
    the measured refinement seconds (bottom), one column per dataset, a line per (G_F,
    start, objective); budget 0 is the start's own field."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(dict.fromkeys(s["dataset"] for s in summaries))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6.5 * len(datasets), 9), squeeze=False)
    for column, dataset in enumerate(datasets):
        lines: Dict[str, List[dict]] = {}
        for s in summaries:
            if s["dataset"] == dataset and s["scale"]:
                lines.setdefault(s["setting"].rsplit("/x", 1)[0] + f" (G_F: {s['run']})",
                                 []).append(s)
        for label, points in lines.items():
            points.sort(key=lambda p: float(p["scale"]))
            style = "o-" if "/plain" in label else "s--"
            dice = [p["dice"] for p in points]
            axes[0, column].plot([float(p["scale"]) for p in points], dice, style, label=label,
                                 markersize=4)
            axes[1, column].plot([p["refine_s"] for p in points], dice, style, label=label,
                                 markersize=4)
        axes[0, column].set_xscale("symlog", linthresh=0.1)
        axes[0, column].set_xlabel("budget: the default steps (8 mm x 40, 4 mm x 30, 2 mm x 15) "
                                   "times", fontsize=8)
        axes[1, column].set_xlabel("measured refinement seconds per case (1 core, a shared "
                                   "machine)", fontsize=8)
        for row in (0, 1):
            axes[row, column].set_title(f"{dataset}: validation subjects")
            axes[row, column].set_ylabel("Dice (%)")
            axes[row, column].grid(alpha=0.3)
        axes[0, column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(spec: dict, config_path, threads: int) -> None:
    """``summary.md``, ``summary.csv``, ``curves.png`` and ``provenance.json`` from the
    measured cases of ``spec['out']``."""
    import json
    import sys
    from ltnet_keras.records import (atomic_write_text, csv_text, package_versions,
                                     without_machine_paths)
    out = Path(spec["out"])
    summaries = summarise(read_cases(out))
    notes = [f"Config: `{config_path}`. Each case is a whole `Segmenter.segment` of a validation "
             "subject (alignment where the run aligns, network, refinement, labels to the scan's "
             f"grid), one untimed warm-up case per setting; {threads} TensorFlow thread(s). "
             "Dice: per subject the mean over merged structures (the project's), then the mean "
             "(std) over subjects; per-label Dice: mean over the protocol's labels. "
             "Inverse consistency: mean |F(p) + B(p + F(p))| (mm) of the ltnet objective's "
             "fields. Setting names: start/objective/x(budget scale of the default levels' "
             "steps; x0 = no refinement)."]
    atomic_write_text(out / "summary.md", summary_markdown(summaries, spec.get(
        "title", "LT-Net at test time"), notes))
    columns = ("dataset", "run", "setting", "start", "objective", "scale", "n", "dice",
               "dice_std", "dice_label", "refine_s", "segment_s", "inverse_consistency_mm",
               "folding_percent")
    atomic_write_text(out / "summary.csv", csv_text(columns, [
        [f"{s[c]:.4f}" if isinstance(s[c], float) else s[c] for c in columns]
        for s in summaries]))
    if not spec.get("ablation"):
        plot_curves(summaries, out / "curves.png")
    record = {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "spec": spec,
              "threads": threads, "packages": package_versions(),
              "seeds": "none: refinement is deterministic"}
    atomic_write_text(out / "provenance.json", json.dumps(
        without_machine_paths(record, [Path.cwd()]), indent=2, default=str))
