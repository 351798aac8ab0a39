"""Segmentation accuracy as the paper reports it: Dice per label and per merged structure,
and the regularity of the forward field that produced it (folding, spread of log|J|).

The paper's Tables 1-3 and 5 give, for each method, the mean (std), min and max over test
subjects of each subject's mean Dice over the merged (left/right) structures; Table 4 gives the
Dice of each structure. Dice values in the dictionaries are fractions in [0, 1]; summaries and
printed tables are in percent. Numpy only (no TensorFlow).
"""
import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.records import atomic_write_text, csv_text

LEVELS = ("structure", "label")
LABEL_FILE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".npz")
# What to do with label ids that are not in the label table: refuse the file, or score those
# voxels as background (with a warning).
UNKNOWN_LABELS = ("error", "background")


# ----------------------------------------------------------------------------- Dice

def _check_pair(pred, truth):
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match truth shape {truth.shape}")
    return pred, truth


def _confusion(pred, truth, ids) -> np.ndarray:
    """Joint voxel counts ``C[i, j]`` of pred channel ``i`` and truth channel ``j``.

    Channel ``k >= 1`` is ``ids[k - 1]``; channel 0 collects background and every value not in
    ``ids``. One pass over the volume serves all labels and all structures, and merged-structure
    overlaps include voxels labelled left in one map and right in the other.
    """
    pred, truth = _check_pair(pred, truth)
    ids = np.asarray(list(ids), dtype=np.int64)
    n = len(ids) + 1
    top = int(max(pred.max(initial=0), truth.max(initial=0), ids.max(initial=0))) + 1
    if min(pred.min(initial=0), truth.min(initial=0)) < 0:
        raise ValueError("label maps must not contain negative values")
    lookup = np.zeros(top, dtype=np.int64)
    lookup[ids] = np.arange(1, n)
    p = lookup[pred.astype(np.int64, copy=False).ravel()]
    t = lookup[truth.astype(np.int64, copy=False).ravel()]
    return np.bincount(p * n + t, minlength=n * n).reshape(n, n)


def _dice_of(confusion, channels) -> float:
    channels = np.asarray(channels)
    pred_size = confusion[channels, :].sum()
    truth_size = confusion[:, channels].sum()
    if pred_size + truth_size == 0:
        return float("nan")
    overlap = confusion[np.ix_(channels, channels)].sum()
    return float(2.0 * overlap / (pred_size + truth_size))


def dice_per_label(pred, truth, ids) -> Dict[int, float]:
    """Dice ``2|A∩B| / (|A| + |B|)`` of each label id; NaN where the id is in neither map."""
    ids = [int(i) for i in ids]
    confusion = _confusion(pred, truth, ids)
    return {label_id: _dice_of(confusion, [k]) for k, label_id in enumerate(ids, start=1)}


def _structure_dice(confusion, table) -> Dict[str, float]:
    channel_of = {int(label_id): k for k, label_id in enumerate(table.ids.tolist(), start=1)}
    return {name: _dice_of(confusion, [channel_of[i] for i in members])
            for name, members in table.structure_ids().items()}


def dice_per_structure(pred, truth, table) -> Dict[str, float]:
    """Dice of each merged structure: the union of its labels (e.g. left and right) in each map."""
    return _structure_dice(_confusion(pred, truth, table.ids), table)


def _nanmean(values) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# ----------------------------------------------------------------------------- folding

#: Field-regularity columns, in the order CSVs and summaries give them.
DEFORMATION_METRICS = ("folding_percent", "log_jacobian_std")


def jacobian_determinant(forward_field) -> np.ndarray:
    """``det(I + grad u)`` at every voxel of a displacement field ``(x, y, z, 3)`` in voxels.

    Derivatives are central differences (second-order one-sided at the borders, so a quadratic
    field is differentiated exactly everywhere). ``det <= 0`` marks a voxel where the map
    ``t -> t + u(t)`` folds (is not locally invertible).
    """
    forward_field = np.asarray(forward_field, dtype=np.float64)
    if forward_field.ndim != 4 or forward_field.shape[-1] != 3:
        raise ValueError(f"a displacement field must be (x, y, z, 3); got {forward_field.shape}")
    if min(forward_field.shape[:3]) < 3:
        raise ValueError(f"field {forward_field.shape[:3]} too small for differences")
    # jacobian[..., i, j] = d u_i / d x_j
    jacobian = np.stack([np.stack(np.gradient(forward_field[..., i], edge_order=2), axis=-1)
                         for i in range(3)], axis=-2)
    return np.linalg.det(jacobian + np.eye(3))


def folding_stats(forward_field) -> Dict[str, float]:
    """``folding_percent``: % of voxels with ``det J <= 0``; ``log_jacobian_std``: std over
    voxels of ``log |det J|`` (|det J| floored at 1e-9), 0 for a locally volume-preserving map."""
    determinant = jacobian_determinant(forward_field)
    log_abs = np.log(np.maximum(np.abs(determinant), 1e-9))
    return {"folding_percent": float(100.0 * np.mean(determinant <= 0.0)),
            "log_jacobian_std": float(np.std(log_abs))}


@dataclass
class SubjectScores:
    """Dice of one subject: per label id and per merged structure (fractions); optionally the
    regularity of its forward field (``deformation``: :data:`DEFORMATION_METRICS`)."""
    subject: str
    labels: Dict[int, float] = field(default_factory=dict)
    structures: Dict[str, float] = field(default_factory=dict)
    deformation: Dict[str, float] = field(default_factory=dict)

    @property
    def mean_label(self) -> float:
        """Mean Dice over labels present in prediction or truth (NaN entries ignored)."""
        return _nanmean(self.labels.values())

    @property
    def mean_structure(self) -> float:
        """Mean Dice over merged structures (NaN entries ignored): the paper's per-subject score."""
        return _nanmean(self.structures.values())

    def mean(self, level="structure") -> float:
        _check_level(level)
        return self.mean_structure if level == "structure" else self.mean_label


def evaluate_pair(pred, truth, table, subject="") -> SubjectScores:
    """Per-label and per-structure Dice of one predicted label map against its truth."""
    confusion = _confusion(pred, truth, table.ids)
    labels = {int(label_id): _dice_of(confusion, [k])
              for k, label_id in enumerate(table.ids.tolist(), start=1)}
    return SubjectScores(str(subject), labels, _structure_dice(confusion, table))


# ----------------------------------------------------------------------------- summaries

def _check_level(level):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {level!r}")


def summarise(scores_list: Sequence[SubjectScores], level="structure") -> Dict[str, float]:
    """Mean, std, min and max (percent) over subjects of each subject's mean Dice.

    ``level="structure"`` (default, as in the paper) averages each subject over merged
    structures, ``"label"`` over individual labels. ``std`` is the population standard
    deviation (ddof=0). Subjects whose mean is NaN (nothing labelled) are left out; ``n`` counts
    the subjects used.
    """
    _check_level(level)
    means = np.array([s.mean(level) for s in scores_list], dtype=np.float64) * 100.0
    means = means[~np.isnan(means)]
    if means.size == 0:
        raise ValueError("no subject with a defined Dice to summarise")
    summary = {"mean": float(means.mean()), "std": float(means.std(ddof=0)),
               "min": float(means.min()), "max": float(means.max()), "n": int(means.size)}
    for metric in DEFORMATION_METRICS:
        values = [s.deformation[metric] for s in scores_list if metric in s.deformation]
        if values:
            summary[metric] = float(np.mean(values))
    return summary


def structure_summary(scores_list: Sequence[SubjectScores]) -> Dict[str, Dict[str, float]]:
    """Per structure: mean and population std (percent) over subjects, NaN subjects ignored."""
    names = list(scores_list[0].structures) if scores_list else []
    summary = {}
    for name in names:
        values = np.array([s.structures.get(name, np.nan) for s in scores_list]) * 100.0
        values = values[~np.isnan(values)]
        summary[name] = ({"mean": float(values.mean()), "std": float(values.std(ddof=0))}
                         if values.size else {"mean": float("nan"), "std": float("nan")})
    return summary


def format_summary_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Paper-style table (Tables 1-3, 5): one line per method, ``Mean (std)  Min  Max`` in percent."""
    width = max([len("Method")] + [len(name) for name in rows])
    # Folding columns only when some row has them (methods with a forward field).
    folding = any("folding_percent" in s for s in rows.values())
    header = f"{'Method':<{width}}  {'Mean (std)':>12}  {'Min':>5}  {'Max':>5}"
    lines = [header + (f"  {'Fold %':>7}  {'sd log|J|':>9}" if folding else "")]
    for name, s in rows.items():
        mean_std = f"{s['mean']:.1f} ({s['std']:.1f})"
        line = f"{name:<{width}}  {mean_std:>12}  {s['min']:>5.1f}  {s['max']:>5.1f}"
        if folding:
            line += (f"  {s['folding_percent']:>7.3f}  {s['log_jacobian_std']:>9.3f}"
                     if "folding_percent" in s else f"  {'-':>7}  {'-':>9}")
        lines.append(line)
    return "\n".join(lines)


def format_structure_table(results: Mapping[str, Sequence[SubjectScores]]) -> str:
    """Table 4 layout transposed: one row per merged structure, one ``mean (std)`` column per method."""
    summaries = {method: structure_summary(scores) for method, scores in results.items()}
    structures: List[str] = []
    for summary in summaries.values():
        structures += [name for name in summary if name not in structures]
    width = max([len("Structure")] + [len(name) for name in structures])
    columns = {method: max(len(method), 12) for method in summaries}
    lines = ["  ".join([f"{'Structure':<{width}}"]
                       + [f"{method:>{columns[method]}}" for method in summaries])]
    for name in structures:
        cells = []
        for method, summary in summaries.items():
            s = summary.get(name, {"mean": float("nan"), "std": float("nan")})
            cells.append(f"{s['mean']:.1f} ({s['std']:.1f})".rjust(columns[method]))
        lines.append("  ".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CSV files

def _number(value) -> str:
    return "nan" if np.isnan(value) else f"{value:.6f}"


def write_scores_csv(scores_list: Sequence[SubjectScores], path):
    """One row per subject: ``subject, mean_label, mean_structure``, each structure, then each
    label as ``label_<id>``. Values are Dice fractions with six decimals; ``nan`` where undefined."""
    structures: List[str] = []
    label_ids: List[int] = []
    for s in scores_list:
        structures += [name for name in s.structures if name not in structures]
        label_ids += [i for i in s.labels if i not in label_ids]
    deformation = [m for m in DEFORMATION_METRICS if any(m in s.deformation for s in scores_list)]
    header = (["subject", "mean_label", "mean_structure"] + deformation + structures
              + [f"label_{i}" for i in label_ids])
    rows = [[s.subject, _number(s.mean_label), _number(s.mean_structure)]
            + [_number(s.deformation.get(m, np.nan)) for m in deformation]
            + [_number(s.structures.get(name, np.nan)) for name in structures]
            + [_number(s.labels.get(i, np.nan)) for i in label_ids]
            for s in scores_list]
    atomic_write_text(path, csv_text(header, rows))


def read_scores_csv(path) -> List[SubjectScores]:
    """Read what :func:`write_scores_csv` wrote."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        scores = []
        for row in reader:
            labels, structures, deformation = {}, {}, {}
            for column, value in row.items():
                if column in ("subject", "mean_label", "mean_structure"):
                    continue
                if column in DEFORMATION_METRICS:
                    deformation[column] = float(value)
                elif column.startswith("label_") and column[len("label_"):].isdigit():
                    labels[int(column[len("label_"):])] = float(value)
                else:
                    structures[column] = float(value)
            scores.append(SubjectScores(row["subject"], labels, structures, deformation))
    return scores


def write_summary_csv(rows: Mapping[str, Mapping[str, float]], path, level="structure"):
    """One row per method: ``method, level, n, mean, std, min, max`` (percent, std with ddof=0),
    then the subjects' mean ``folding_percent`` and ``log_jacobian_std`` where any row has them."""
    _check_level(level)
    columns = ["mean", "std", "min", "max"] + [
        m for m in DEFORMATION_METRICS if any(m in s for s in rows.values())]
    body = [[name, level, s.get("n", ""), *(f"{s[key]:.4f}" if key in s else "" for key in columns)]
            for name, s in rows.items()]
    atomic_write_text(path, csv_text(["method", "level", "n"] + columns, body))


# ----------------------------------------------------------------------------- folders

def _label_files(folder: Path) -> Dict[str, Path]:
    """Label files of a folder by subject id; a dataset root is read from its ``labels/``."""
    from ltnet_keras.data.io import subject_id

    def listing(directory):
        return {subject_id(p): p for p in sorted(directory.iterdir())
                if p.is_file() and not p.name.startswith(".")
                and p.name.lower().endswith(LABEL_FILE_SUFFIXES)}

    files = listing(folder)
    if not files and (folder / "labels").is_dir():
        files = listing(folder / "labels")
    if not files:
        raise VolumeError(folder, "no label files (.nii.gz, .nii, .mgz, .npz) in this folder")
    return files


def _pair_paths(pred: Path, truth: Path, strict: bool) -> List[tuple]:
    from ltnet_keras.data.io import subject_id

    if not pred.exists():
        raise VolumeError(pred, "prediction path does not exist")
    if not truth.exists():
        raise VolumeError(truth, "truth path does not exist")
    if pred.is_file() and truth.is_file():
        return [(subject_id(truth), pred, truth)]
    if pred.is_file():
        # One fixed map against every subject (e.g. the atlas labels without registration);
        # the subject the map belongs to is left out.
        own = subject_id(pred)
        return [(i, pred, t) for i, t in _label_files(truth).items() if i != own]
    preds = _label_files(pred) if pred.is_dir() else {subject_id(pred): pred}
    truths = _label_files(truth) if truth.is_dir() else {subject_id(truth): truth}
    common = [i for i in truths if i in preds]
    if not common:
        raise VolumeError(pred, f"no prediction matches a truth subject by id; predictions: "
                                f"{sorted(preds)}; truth ({truth}): {sorted(truths)}")
    missing = [i for i in truths if i not in preds]
    extra = [i for i in preds if i not in truths]
    if missing and strict and truth.is_dir():
        raise VolumeError(pred, f"no prediction for truth subjects {missing}")
    if missing and truth.is_dir():
        warnings.warn(f"{pred}: no prediction for truth subjects {missing}; skipped")
    if extra and pred.is_dir():
        warnings.warn(f"{pred}: predictions without truth {extra}; skipped")
    return [(i, preds[i], truths[i]) for i in common]


def _known_labels(volume, table, unknown_labels) -> np.ndarray:
    """The label map of ``volume`` with ids absent from ``table`` set to background 0, said
    once per file (``"background"``, :meth:`LabelTable.restrict`), or refused (``"error"``)."""
    if unknown_labels == "error":
        table.check_ids(volume.array, source=volume.path,
                        hint="to score them as background use unknown_labels='background' "
                             "(ltnet evaluate --unknown-labels background)")
    return table.restrict(volume.array, source=volume.path)


def evaluate_folders(pred, truth, table, strict=False,
                     unknown_labels="background") -> List[SubjectScores]:
    """Dice of predicted label maps against truth; ``pred`` and ``truth`` are files or folders.

    Folders are matched by subject id (file name without extension, exact match); a folder
    holding no label files but a ``labels/`` sub-folder (a dataset root) is read from there.
    Truth subjects without a prediction raise a VolumeError when ``strict``, else are skipped
    with a warning. Each prediction must be on its truth's grid: same shape, voxel centres
    within a tenth of a voxel (``io.check_same_grid``; a VolumeError names both files and the
    offset in mm). Label ids absent from ``table`` in either map are scored as background with
    one warning per file (a protocol such as FreeSurfer's 28 labels leaves out some of aseg's
    ids), or with ``unknown_labels="error"`` refused (VolumeError naming the file and the ids).
    """
    from ltnet_keras.data.io import check_same_grid, load_label_map

    if unknown_labels not in UNKNOWN_LABELS:
        raise ValueError(f"unknown_labels must be one of {', '.join(UNKNOWN_LABELS)}; "
                         f"got {unknown_labels!r}")
    scores = []
    for subject, pred_path, truth_path in _pair_paths(Path(pred), Path(truth), strict):
        pred_map, truth_map = load_label_map(pred_path), load_label_map(truth_path)
        check_same_grid(pred_map, truth_map, "prediction", "truth")
        scores.append(evaluate_pair(_known_labels(pred_map, table, unknown_labels),
                                    _known_labels(truth_map, table, unknown_labels),
                                    table, subject))
    return scores


def report(run_dir, results: Dict[str, List[SubjectScores]], title: str) -> str:
    """Write per-subject CSVs, ``summary.csv`` and ``results.md``; return the Markdown."""
    run_dir = Path(run_dir)
    summaries = {}
    for method, scores in results.items():
        write_scores_csv(scores, run_dir / f"scores_{method}.csv")
        summaries[method] = summarise(scores)
    write_summary_csv(summaries, run_dir / "summary.csv")
    text = "\n".join([
        f"# {title}", "",
        "Mean Dice (%) over merged left/right structures per subject; mean (std), min, max over "
        "subjects.", "", "```", format_summary_table(summaries), "```", "",
        "Per structure:", "", "```", format_structure_table(results), "```", ""])
    atomic_write_text(run_dir / "results.md", text)
    return text
