"""Calibrating the QC model (:mod:`ltnet_keras.inference.qc`) on labelled validation scans and
degraded copies of them (:mod:`ltnet_keras.data.degrade`).

Each case (subject x degradation x severity, plus the clean scan) is segmented as a user would
(the run's segmenter, refinement on, QC signals measured) and scored against the subject's
manual labels. Rows go to ``cases.csv`` as they come, so an interrupted calibration resumes.
The model is then fitted on all rows (``qc_model.json``) and judged honestly by leaving one
subject out at a time: each subject's cases are predicted by a model fitted on the others
(``summary.md``: Spearman correlation, flag rates; ``calibration.png``).
"""
import csv
import itertools
import json
import tempfile
import time
import zlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.data.degrade import DEGRADATIONS, degrade
from ltnet_keras.data.io import find_subjects, load_image, load_label_map, save_volume
from ltnet_keras.inference.qc import BAD_MARGIN, MEAN_FEATURES, QCModel
from ltnet_keras.records import atomic_write_text, csv_text, package_versions, shown_path


#: At most this many signals in the mean-Dice line (chosen by :func:`select_features`).
MOST_FEATURES = 3


@dataclass
class CalibrationSettings:
    """What to calibrate on: ``subjects`` (validation ids of the run's data root),
    ``degradations`` (names of :data:`DEGRADATIONS`) at ``severities``, ``seed``;
    ``align`` (default: the run's) and ``refine`` levels and objective as ``ltnet segment
    --refine`` (``ltnet``: the forward-backward round trip is a signal too)."""
    subjects: Sequence[str]
    degradations: Sequence[str] = tuple(DEGRADATIONS)
    severities: Sequence[int] = (1, 2)
    seed: int = 0
    align: Optional[str] = None
    refine_levels: Optional[Sequence[Sequence[int]]] = None
    refine_objective: str = "plain"
    extra: Dict[str, object] = field(default_factory=dict)

    def cases(self):
        yield ("clean", 0)
        for kind in self.degradations:
            for severity in self.severities:
                yield (kind, severity)


def case_key(row) -> tuple:
    return (row["subject"], row["degradation"], int(row["severity"]))


def read_cases(path) -> List[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key not in ("subject", "degradation", "status"):
                row[key] = float(value) if value not in ("", None) else float("nan")
    return rows


def _write_cases(path, rows: List[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    atomic_write_text(path, csv_text(keys, [[r.get(k, "") for k in keys] for r in rows]))


def score_case(segmenter, image_path, truth, protocol) -> dict:
    """Segment one (possibly degraded) scan and score it: signals, seconds, Dice (0-1) mean over
    merged structures and per structure."""
    clock = time.perf_counter()
    result = segmenter.segment(image_path)
    seconds = time.perf_counter() - clock
    scores = evaluation.evaluate_pair(result.labels, truth, protocol)
    row = dict(result.signals)
    row.update({"dice": scores.mean_structure, "seconds": seconds})
    row.update({f"dice_{name}": value for name, value in scores.structures.items()})
    return row


def calibrate(run_dir, settings: CalibrationSettings, out_dir, log=print) -> QCModel:
    """Segment and score every case (resuming ``out_dir/cases.csv``), then fit and judge the
    model; writes ``qc_model.json``, ``summary.md``, ``calibration.png``, ``provenance.json``."""
    from ltnet_keras.inference.refine import RefineSettings
    from ltnet_keras.inference.segment import Segmenter
    out_dir = Path(out_dir)
    refine = RefineSettings(objective=settings.refine_objective)
    if settings.refine_levels:
        refine = dataclasses.replace(refine, levels=tuple(tuple(level)
                                                          for level in settings.refine_levels))
    segmenter = Segmenter(run_dir, align=settings.align, refine=refine,
                          alignment_check="off", measure_qc=True)
    protocol = segmenter.protocol
    root = segmenter.config.data.resolved_root()
    found = find_subjects(root)
    rows = read_cases(out_dir / "cases.csv")
    done = {case_key(r) for r in rows}
    with tempfile.TemporaryDirectory(prefix="ltnet_qc_") as folder:
        for subject in settings.subjects:
            files = found[subject]
            scan = load_image(files.image)
            truth = load_label_map(files.label).array
            for number, (kind, severity) in enumerate(settings.cases()):
                key = (subject, kind, severity)
                if key in done:
                    continue
                path = files.image
                if kind != "clean":
                    seed = settings.seed * 1000 + zlib.crc32(f'{subject}/{kind}'.encode()) % 997 \
                        + severity
                    degraded = degrade(scan.array, kind, severity, seed)
                    path = save_volume(degraded, Path(folder) / f"{subject}_{kind}_{severity}"
                                       ".nii.gz", scan.affine)
                row = {"subject": subject, "degradation": kind, "severity": severity}
                try:
                    row.update(score_case(segmenter, path, truth, protocol))
                    row["status"] = "ok"
                except Exception as error:  # a case that fails is a result too
                    row["status"] = f"failed: {type(error).__name__}: {error}"[:200]
                rows.append(row)
                _write_cases(out_dir / "cases.csv", rows)
                log(f"  {subject} {kind} {severity}: Dice {100 * row.get('dice', np.nan):.1f} "
                    f"ncc {row.get('ncc_mean', np.nan):.3f} ({row['status']})")
    usable = [r for r in rows if r["status"] == "ok"]
    model = QCModel.fit(usable, features=select_features(usable))
    judged = leave_one_subject_out(usable)
    model.notes = {"fitted_on": len(usable), "subjects": list(settings.subjects),
                   "bad_margin": BAD_MARGIN, **judged["summary"]}
    model.save(out_dir / "qc_model.json")
    _write_summary(out_dir, usable, rows, judged, model, settings, run_dir)
    return model


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).correlation)


def _loso_spearman(rows: List[dict], features) -> float:
    subjects = sorted({r["subject"] for r in rows})
    pairs = []
    for subject in subjects:
        model = QCModel.fit([r for r in rows if r["subject"] != subject], threshold=0.0,
                            features=features)
        pairs += [(model.predict(r)["predicted_dice"], r["dice"]) for r in rows
                  if r["subject"] == subject]
    return spearman(*zip(*pairs))


def select_features(rows: List[dict], most: int = MOST_FEATURES) -> tuple:
    """The signals of the mean-Dice line: of every subset of at most ``most`` of
    :data:`MEAN_FEATURES` that the rows have, the one whose predictions rank the cases best
    when each subject is predicted by a model of the others (fewer signals on a tie)."""
    available = [f for f in MEAN_FEATURES if all(f in r and r[f] == r[f] for r in rows)]
    subsets = [s for k in range(1, most + 1) for s in itertools.combinations(available, k)]
    return max(subsets, key=lambda s: (round(_loso_spearman(rows, s), 6), -len(s)))


def leave_one_subject_out(rows: List[dict]) -> dict:
    """Each subject's cases predicted (and flagged) by a model fitted on the other subjects'
    cases, its signals chosen (:func:`select_features`) on those other subjects too, so that
    nothing of the subject judged was seen; the clean median and the 'bad' cases (true Dice
    more than :data:`BAD_MARGIN` below the clean cases' median) as the issue defines them."""
    subjects = sorted({r["subject"] for r in rows})
    predicted, flags = {}, {}
    for subject in subjects:
        others = [r for r in rows if r["subject"] != subject]
        model = QCModel.fit(others, features=select_features(others))
        for i, r in enumerate(rows):
            if r["subject"] == subject:
                predicted[i] = model.predict(r)["predicted_dice"]
                flags[i] = model.flag(predicted[i])
    clean_median = float(np.median([r["dice"] for r in rows if r["degradation"] == "clean"]))
    bad = [i for i, r in enumerate(rows) if r["dice"] < clean_median - BAD_MARGIN]
    clean = [i for i, r in enumerate(rows) if r["degradation"] == "clean"]
    order = list(range(len(rows)))
    summary = {
        "spearman_loso": spearman([predicted[i] for i in order], [rows[i]["dice"] for i in order]),
        "clean_median_dice": clean_median, "bad_cases": len(bad),
        "bad_flagged": sum(flags[i] == "check" for i in bad),
        "clean_cases": len(clean), "clean_flagged": sum(flags[i] == "check" for i in clean)}
    summary["bad_flagged_fraction"] = summary["bad_flagged"] / max(len(bad), 1)
    return {"predicted": predicted, "flags": flags, "summary": summary}


def _write_summary(out_dir: Path, usable, rows, judged, model: QCModel, settings, run_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = judged["summary"]
    kinds = list(dict.fromkeys(r["degradation"] for r in usable))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for kind in kinds:
        index = [i for i, r in enumerate(usable) if r["degradation"] == kind]
        ax.scatter([100 * usable[i]["dice"] for i in index],
                   [100 * judged["predicted"][i] for i in index], label=kind, s=18)
    low = 100 * min(min(r["dice"] for r in usable), min(judged["predicted"].values())) - 2
    ax.plot([low, 100], [low, 100], "k:", lw=1)
    ax.axhline(100 * model.threshold, color="r", lw=1, ls="--", label="check below")
    ax.axvline(100 * (s["clean_median_dice"] - BAD_MARGIN), color="grey", lw=1, ls="--")
    ax.set_xlabel("true mean Dice (%)")
    ax.set_ylabel("predicted mean Dice (%), subject left out")
    ax.set_title(f"QC calibration: Spearman {s['spearman_loso']:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "calibration.png", dpi=90)
    plt.close(fig)
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [
        f"# QC calibration: {Path(run_dir).name} ({len(usable)} cases, {len(failed)} failed)", "",
        f"Subjects {', '.join(settings.subjects)}; degradations {', '.join(settings.degradations)}"
        f" at severities {', '.join(map(str, settings.severities))}, plus each clean scan; "
        "refinement on. Judged leaving one subject out (its cases predicted by a model fitted on "
        "the others).", "",
        "| measure | value |", "|---|---|",
        f"| Spearman, predicted vs true mean Dice | {s['spearman_loso']:.3f} |",
        f"| clean median Dice | {100 * s['clean_median_dice']:.1f} |",
        f"| cases > {100 * BAD_MARGIN:.0f} points below it, flagged | {s['bad_flagged']} of "
        f"{s['bad_cases']} ({100 * s['bad_flagged_fraction']:.0f} %) |",
        f"| clean cases flagged | {s['clean_flagged']} of {s['clean_cases']} |",
        f"| threshold (predicted Dice, model fitted on all) | {100 * model.threshold:.1f} |", "",
        "Threshold rule (`qc.choose_threshold`): half the bad margin below the clean cases' "
        "median predicted Dice, lowered if that would flag more than a fifth of the clean "
        "cases.", "",
        "| degradation | n | true Dice | predicted (left out) | flagged |", "|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["degradation"] for r in usable):
        index = [i for i, r in enumerate(usable) if r["degradation"] == kind]
        lines.append(f"| {kind} | {len(index)} | "
                     f"{100 * np.mean([usable[i]['dice'] for i in index]):.1f} | "
                     f"{100 * np.mean([judged['predicted'][i] for i in index]):.1f} | "
                     f"{sum(judged['flags'][i] == 'check' for i in index)} |")
    for r in failed:
        lines.append(f"\nFailed: {r['subject']} {r['degradation']} {r['severity']}: {r['status']}")
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "provenance.json", json.dumps({
        "run": shown_path(run_dir), "settings": {
            "subjects": list(settings.subjects), "degradations": list(settings.degradations),
            "severities": list(settings.severities), "seed": settings.seed,
            "align": settings.align, "refine_levels": settings.refine_levels,
            "refine_objective": settings.refine_objective},
        "packages": package_versions(), "summary": s}, indent=2, default=str))
