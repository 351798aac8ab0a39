"""Quality control of a segmentation without its truth: signals measured on the scan, and a
small calibrated model that turns them into a predicted Dice (SynSeg's ``--qc`` in spirit).

Signals (:func:`qc_signals`), on the grid the field was found on, at 2 mm:
- ``ncc_<structure>``: local NCC (9 mm window) between the scan and the warped atlas inside each
  merged structure of the warped atlas' labels: where the atlas no longer looks like the scan
  (noise, blur, a structure cut off, a wrong match), the labels are doubtful there;
- ``ncc_mean``: the same over every labelled voxel; ``ncc_low``: the mean of the three lowest
  structures;
- ``sharpness_log_ratio``: log of the ratio of the scan's mean gradient magnitude to the
  warped atlas' inside the labels, and ``sharpness_deviation``, its absolute value: blur
  (< 0) and noise (> 0) move it, while the NCC of a blurred scan can even rise;
- ``empty_fraction``: the fraction of the labelled voxels where the scan is (nearly) empty,
  e.g. cut off by a partial field of view: labels there are guesses;
- ``folding_percent`` of the field the labels were warped with;
- ``alignment_ncc``: the affine alignment's similarity to the atlas (aligned scans);
- ``atlas_disagreement``: with several atlases, the fraction of labelled voxels where they do
  not all agree.
- ``inverse_consistency_mm``: with ``--refine-objective ltnet``, the mean length of the
  forward-backward round trip (:mod:`ltnet_keras.inference.refine_cycle`).

The model (:class:`QCModel`): per merged structure, a least-squares line from its NCC to its
Dice; for the mean, a least-squares line from the few signals (of :data:`MEAN_FEATURES`) that
the calibration found to rank its cases best; both clipped to [0, 1]. A scan is flagged
``check`` when its predicted mean Dice falls below ``threshold``. Fitted by
:mod:`ltnet_keras.study.qc_calibration` on the validation subjects and degraded copies of
them; kept as ``<run>/qc_model.json``.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

QC_SPACING = 2          # voxels of the field's grid per QC voxel (2 mm on a 1 mm grid)
QC_WINDOW = 5           # local NCC window in QC voxels (~9 mm at 2 mm)
MEAN_FEATURES = ("ncc_mean", "ncc_low", "sharpness_log_ratio", "sharpness_deviation",
                 "empty_fraction", "folding_percent", "alignment_ncc", "atlas_disagreement",
                 "inverse_consistency_mm")
#: Below this (normalised intensity) a voxel of the scan counts as empty.
EMPTY_LEVEL = 0.02
MODEL_FILE = "qc_model.json"


def local_ncc(a: np.ndarray, b: np.ndarray, window: int = QC_WINDOW) -> np.ndarray:
    """Local normalised cross-correlation of two images in a ``window``^3 box at every voxel
    (0 where either image is flat in the box)."""
    from scipy.ndimage import uniform_filter
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean_a, mean_b = uniform_filter(a, window), uniform_filter(b, window)
    cov = uniform_filter(a * b, window) - mean_a * mean_b
    var_a = uniform_filter(a * a, window) - mean_a ** 2
    var_b = uniform_filter(b * b, window) - mean_b ** 2
    denominator = np.sqrt(np.clip(var_a, 0, None) * np.clip(var_b, 0, None))
    return np.where(denominator > 1e-8, cov / np.maximum(denominator, 1e-8), 0.0)


def qc_signals(atlas_image: np.ndarray, atlas_labels: np.ndarray, target: np.ndarray,
               sampling_positions: np.ndarray, table, folding_percent: float,
               alignment_ncc: Optional[float] = None) -> Dict[str, float]:
    """The signals above for one scan: ``target`` and ``sampling_positions`` ``(X, Y, Z, 3)``
    (where each voxel of the target's grid samples the atlas, in atlas voxels) on the same
    grid; ``table``: the protocol (merged structures)."""
    from scipy.ndimage import map_coordinates
    from ltnet_keras.data.preprocess import normalise_intensity
    step = (slice(None, None, QC_SPACING),) * 3
    positions = np.moveaxis(np.asarray(sampling_positions[step], np.float32), -1, 0)
    warped = map_coordinates(normalise_intensity(atlas_image), positions, order=1, mode="nearest")
    labels = map_coordinates(np.asarray(atlas_labels), positions, order=0, mode="nearest")
    target = normalise_intensity(np.asarray(target, np.float32)[step])
    ncc = local_ncc(warped, target)
    signals = {"ncc_mean": float(ncc[labels > 0].mean()) if (labels > 0).any() else 0.0}
    for structure, ids in table.structure_ids().items():
        inside = np.isin(labels, ids)
        signals[f"ncc_{structure}"] = float(ncc[inside].mean()) if inside.any() else 0.0
    by_structure = sorted(v for k, v in signals.items() if k != "ncc_mean")
    signals["ncc_low"] = float(np.mean(by_structure[:3]))
    signals["sharpness_log_ratio"] = sharpness_log_ratio(target, warped, labels > 0)
    signals["sharpness_deviation"] = abs(signals["sharpness_log_ratio"])
    signals["empty_fraction"] = (float((target[labels > 0] < EMPTY_LEVEL).mean())
                                 if (labels > 0).any() else 0.0)
    signals["folding_percent"] = float(folding_percent)
    if alignment_ncc is not None:
        signals["alignment_ncc"] = float(alignment_ncc)
    return signals


def sharpness_log_ratio(target: np.ndarray, warped: np.ndarray, inside: np.ndarray) -> float:
    """log(mean |grad target| / mean |grad warped atlas|) over ``inside`` (0: as sharp;
    < 0: the scan is blurrier, > 0: noisier or sharper)."""
    def sharpness(image):
        return float(np.sqrt(sum(g ** 2 for g in np.gradient(image)))[inside].mean())
    if not inside.any():
        return 0.0
    return float(np.log(max(sharpness(target), 1e-6) / max(sharpness(warped), 1e-6)))


def atlas_disagreement(maps: Sequence[np.ndarray]) -> float:
    """Fraction of voxels labelled by some atlas where the atlases do not all agree."""
    stack = np.stack([np.asarray(m) for m in maps])
    labelled = (stack > 0).any(axis=0)
    differ = (stack != stack[0]).any(axis=0) & labelled
    return float(differ.sum() / max(labelled.sum(), 1))


def _line(x: np.ndarray, y: np.ndarray) -> List[float]:
    """Least-squares intercept and slopes of y on the columns of x."""
    design = np.column_stack([np.ones(len(y)), x])
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coefficients.tolist()


@dataclass
class QCModel:
    """Predicted Dice (0-1) from :func:`qc_signals`: ``mean`` (intercept, slopes over
    ``features``), ``structures`` (per structure: intercept, slope on its NCC) and the
    ``threshold`` below which a scan is flagged ``check``."""
    features: List[str]
    mean: List[float]
    structures: Dict[str, List[float]]
    threshold: float
    notes: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def fit(cls, rows: Sequence[dict], threshold: Optional[float] = None,
            features: Sequence[str] = MEAN_FEATURES) -> "QCModel":
        """Fit on calibration rows (signals plus ``dice`` and ``dice_<structure>``, 0-1).
        Features missing from any row are left out. ``threshold``: given, or set by
        :func:`choose_threshold` on these rows."""
        used = [f for f in features if all(f in r for r in rows)]
        x = np.array([[r[f] for f in used] for r in rows], np.float64)
        y = np.array([r["dice"] for r in rows], np.float64)
        structures = {}
        for key in rows[0]:
            if key.startswith("dice_") and f"ncc_{key[5:]}" in rows[0]:
                name = key[5:]
                structures[name] = _line(np.array([[r[f"ncc_{name}"]] for r in rows]),
                                         np.array([r[key] for r in rows]))
        model = cls(used, _line(x, y), structures, 0.0)
        model.threshold = (choose_threshold(model, rows) if threshold is None
                           else float(threshold))
        return model

    def predict(self, signals: Dict[str, float]) -> Dict[str, float]:
        """``predicted_dice`` and ``predicted_dice_<structure>`` (0-1)."""
        missing = [f for f in self.features if f not in signals]
        if missing:
            raise ValueError(f"QC model needs the signals {missing}, which this segmentation "
                             "does not have (a model calibrated with --align affine used on "
                             "--align none, or with several atlases on one)")
        mean = self.mean[0] + sum(w * signals[f] for w, f in zip(self.mean[1:], self.features))
        out = {"predicted_dice": float(np.clip(mean, 0.0, 1.0))}
        for name, (intercept, slope) in self.structures.items():
            value = intercept + slope * signals.get(f"ncc_{name}", 0.0)
            out[f"predicted_dice_{name}"] = float(np.clip(value, 0.0, 1.0))
        return out

    def flag(self, predicted_dice: float) -> str:
        return "check" if predicted_dice < self.threshold else "ok"

    def to_dict(self) -> dict:
        return {"features": self.features, "mean": self.mean, "structures": self.structures,
                "threshold": self.threshold, "notes": self.notes}

    def save(self, path) -> Path:
        from ltnet_keras.records import atomic_write_text
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path) -> "QCModel":
        from ltnet_keras.data.errors import VolumeError
        try:
            data = json.loads(Path(path).read_text())
            return cls(list(data["features"]), list(data["mean"]),
                       {k: list(v) for k, v in data["structures"].items()},
                       float(data["threshold"]), dict(data.get("notes", {})))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise VolumeError(path, f"not a QC model ({type(error).__name__}: {error})") from None


#: A case is "bad" when its true mean Dice is this far (0-1) below the clean cases' median.
BAD_MARGIN = 0.05


def choose_threshold(model: QCModel, rows: Sequence[dict]) -> float:
    """The flag threshold: half of :data:`BAD_MARGIN` below the clean rows' (``degradation ==
    "clean"``) median prediction, since a bad case is a full margin below the clean median;
    lower still if that would flag more than a fifth of the clean rows."""
    predicted = np.array([model.predict(r)["predicted_dice"] for r in rows])
    clean = np.array([r.get("degradation") == "clean" for r in rows])
    candidates = np.unique(predicted)
    allowed = [t for t in candidates if (predicted[clean] < t).sum() <= 0.2 * clean.sum()]
    fifth = float(max(allowed)) if allowed else float(candidates.min())
    return min(fifth, float(np.median(predicted[clean])) - BAD_MARGIN / 2)
