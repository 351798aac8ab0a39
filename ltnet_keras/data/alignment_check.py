"""Alignment that does not fail silently: the similarity of an aligned scan to the atlas, the
thresholds a run keeps from its training pool, and the check ``ltnet segment`` makes.

An affine registration always returns something. When a header says the wrong orientation
(LPBA40's said LPS over RAS voxels: a half turn about the vertical axis) or the scan is not a
head at all, ANTs settles somewhere and the labels come out meaningless (Dice 0) without a
word. :mod:`ltnet_keras.data.align` therefore tries half-turned starts (:data:`HALF_TURNS`) and
measures the NCC of every aligned scan to the atlas; this module judges that number.

Levels (3 mm NCC, results/alignment_check): LPBA40 scans aligned to an LPBA40 atlas 0.76-0.81,
FreeSurfer scans to a FreeSurfer atlas 0.72-0.75, across protocols (FreeSurfer <-> LPBA40)
0.65-0.74, a head left upside down or back to front (no start search) 0.27-0.50, smooth noise
or a cube phantom 0.16-0.24.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.grids import axis_codes, registration_image, resample, voxel_map
from ltnet_keras.data.io import Volume, subject_id
from ltnet_keras.records import atomic_write_text

__all__ = ["HALF_TURNS", "CHECK_MODES", "CHECK_FILE", "masked_ncc", "foreground_mask",
           "half_turn_start", "coarse_similarity", "alignment_similarity",
           "AlignmentThresholds", "check_similarity", "AlignmentChecker", "record_pool",
           "half_turned_header", "not_a_head"]

#: The starts tried before the affine: no turn, and a half turn about each world axis.
HALF_TURNS = {"identity": np.diag([1.0, 1.0, 1.0]), "x": np.diag([1.0, -1.0, -1.0]),
              "y": np.diag([-1.0, 1.0, -1.0]), "z": np.diag([-1.0, -1.0, 1.0])}
# Each start is scored by the similarity below after a quick rigid registration at 8 mm (10
# iterations): the right start wins by a wide margin (results/alignment_check). Scored on the
# coarse 8 mm grid and the atlas' mask instead, LPBA40 scans aligned to a FreeSurfer atlas had
# the back-to-front start within 0.04 of the right one. A half turn must beat the identity by
# START_MARGIN to be taken, so a scan in the usual orientation keeps exactly the registration
# it had before the search.
START_SPACING, START_ITERATIONS, START_MARGIN = 8.0, 10, 0.02
# The similarity is measured on a 3 mm grid (the registration's, by default): on coarser grids
# a head's outline alone correlates with the atlas' and a cube or a wrong turn scored up to 0.66.
SIMILARITY_SPACING = 3.0
# Below this fraction of the atlas' head covered by the aligned scan, the alignment scores 0.
MIN_COVERAGE = 0.5

CHECK_MODES = ("refuse", "warn", "off")
#: Written beside the pool's alignments (a run's ``aligned/``) by training with data.align.
CHECK_FILE = "alignment_check.json"
# Runs without a record (trained before it existed, or with data.align: none) use these. Warn:
# below every correctly aligned head measured, of either protocol (lowest 0.645). Refuse:
# half-way between the wrong turns and non-heads (highest 0.50) and the heads aligned right.
DEFAULT_WARN, DEFAULT_REFUSE = 0.62, 0.57
# From a pool: warn below the lowest pool scan minus POOL_MARGIN, or the pool's median minus 4
# robust standard deviations if lower (scans of another protocol sit ~0.03-0.12 under a pool:
# they may get a warning, not a refusal); refuse below DEFAULT_REFUSE, or lower when the pool
# itself reaches down there (a pool of noisier scans).
POOL_MARGIN = 0.05


def masked_ncc(image, reference, mask) -> float:
    """Normalised cross-correlation of ``image`` and ``reference`` over ``mask`` (0 where
    either is constant: nothing to correlate)."""
    a, b = (np.asarray(x, np.float64)[mask] for x in (image, reference))
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / norm) if norm > 0 else 0.0


def foreground_mask(reference) -> np.ndarray:
    """The atlas' head (its brain, for a skull-stripped atlas): above a tenth of its 99th
    percentile, so a few bright voxels do not decide it."""
    positive = reference[reference > 0]
    return reference > (0.1 * np.percentile(positive, 99) if positive.size else 0.0)


def centre_of_mass(volume: Volume) -> np.ndarray:
    """World position (mm) of the intensity's centre of mass."""
    from scipy.ndimage import center_of_mass
    weights = np.maximum(volume.array, 0)
    voxel = center_of_mass(weights) if weights.any() else (np.array(volume.shape) - 1) / 2.0
    return (np.asarray(volume.affine) @ np.append(voxel, 1.0))[:3]


def half_turn_start(turn: str, fixed: Volume, moving: Volume) -> np.ndarray:
    """Atlas world -> scan world: the half turn ``turn`` (:data:`HALF_TURNS`) about the atlas'
    centre of mass, carried onto the scan's."""
    start = np.eye(4)
    start[:3, :3] = HALF_TURNS[turn]
    start[:3, 3] = centre_of_mass(moving) - HALF_TURNS[turn] @ centre_of_mass(fixed)
    return start


def coarse_similarity(fixed: Volume, moving: Volume, atlas_to_scan, overlap=False) -> float:
    """:func:`masked_ncc` of the atlas' registration image and the scan's moved onto it, inside
    the atlas' head (:func:`foreground_mask`), or with ``overlap`` where both show the head:
    then a scan stripped of parts the atlas keeps (LPBA40's brains lack some of FreeSurfer's
    brainstem and surroundings) is judged on what it has, and one covering less than
    :data:`MIN_COVERAGE` of the atlas' head scores 0."""
    moved = resample(moving.array, voxel_map(moving.affine, fixed.affine, atlas_to_scan),
                     fixed.shape)
    mask = foreground_mask(fixed.array)
    if overlap:
        both = mask & foreground_mask(moved)
        if both.sum() < MIN_COVERAGE * mask.sum():
            return 0.0
        mask = both
    return masked_ncc(moved, fixed.array, mask)


def alignment_similarity(scan: Volume, atlas: Volume, atlas_to_scan) -> float:
    """How much the scan moved by ``atlas_to_scan`` resembles the atlas: the NCC of the two on
    a :data:`SIMILARITY_SPACING` mm grid where both show the head (:func:`coarse_similarity`).
    ~0.65-0.8 for a head, ~0.25-0.5 for a head turned wrong, ~0.15-0.25 for noise or a cube."""
    codes = axis_codes(atlas.affine)
    return coarse_similarity(registration_image(atlas, codes, SIMILARITY_SPACING),
                             registration_image(scan, codes, SIMILARITY_SPACING), atlas_to_scan,
                             overlap=True)


@dataclass
class AlignmentThresholds:
    """Below ``warn`` a scan is reported, below ``refuse`` refused (NCC after alignment).
    ``pool``: the training scans' similarities they come from (empty for the defaults)."""
    warn: float = DEFAULT_WARN
    refuse: float = DEFAULT_REFUSE
    pool: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_pool(cls, similarities: Dict[str, float]) -> "AlignmentThresholds":
        """Thresholds for a run whose training scans aligned with ``similarities``."""
        values = np.array(list(similarities.values()), np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError(f"pool similarities must be finite numbers, not {similarities}")
        median = np.median(values)
        spread = 1.4826 * np.median(np.abs(values - median))   # a robust standard deviation
        warn = min(values.min() - POOL_MARGIN, median - 4.0 * spread)
        return cls(round(float(warn), 4), round(float(min(DEFAULT_REFUSE, warn)), 4),
                   {k: float(v) for k, v in similarities.items()})

    @classmethod
    def read(cls, folder) -> "AlignmentThresholds":
        """The thresholds kept in ``folder/alignment_check.json``, else the defaults."""
        path = Path(folder) / CHECK_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(float(data["warn"]), float(data["refuse"]), dict(data.get("pool", {})))
        except (ValueError, KeyError, TypeError) as error:
            raise VolumeError(path, f"unreadable alignment check record ({error}); delete it "
                                    "to use the default thresholds") from error

    def write(self, folder) -> Path:
        path = Path(folder) / CHECK_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=2))
        return path

    def describe(self) -> str:
        if not self.pool:
            return (f"warned below {self.warn:.2f}, refused below {self.refuse:.2f} (defaults: "
                    "heads aligned right measured 0.65-0.81)")
        values = list(self.pool.values())
        return (f"the {len(values)} training scans had {min(values):.2f}-{max(values):.2f}; "
                f"warned below {self.warn:.2f}, refused below {self.refuse:.2f}")


def check_similarity(path, similarity: float, thresholds: AlignmentThresholds,
                     mode: str = "refuse") -> Optional[str]:
    """A warning (str) for a scan that resembles the atlas less than ``thresholds.warn`` after
    alignment, None for a good one; with ``mode="refuse"`` a VolumeError naming ``path`` below
    ``thresholds.refuse``. ``mode="off"`` checks nothing."""
    if mode not in CHECK_MODES:
        raise ValueError(f"unknown alignment check {mode!r}; valid: {', '.join(CHECK_MODES)}")
    if mode == "off" or similarity >= thresholds.warn:
        return None
    message = (f"after affine alignment the scan resembles the atlas with NCC {similarity:.2f} "
               f"({thresholds.describe()})")
    if similarity < thresholds.refuse and mode == "refuse":
        raise VolumeError(path, f"{message}: is it a head MRI, and is its header's orientation "
                                "right? Pass --alignment-check warn to segment it anyway")
    return f"{message}: check the aligned scan (--save-aligned)"


class AlignmentChecker:
    """Checks each alignment (:func:`check_similarity`) and remembers it per scan file, so that
    ``ltnet segment`` can align and check every scan before writing any output and reuse the
    alignment to segment it. Warnings go to ``report`` (stderr) and :attr:`warnings`."""

    def __init__(self, thresholds: Optional[AlignmentThresholds] = None, mode: str = "refuse",
                 report: Callable[[str], None] = None):
        check_similarity("", 1.0, AlignmentThresholds(), mode)   # validates ``mode``
        self.thresholds = thresholds or AlignmentThresholds()
        self.mode = mode
        self.report = report or (lambda text: print(f"WARNING: {text}", file=sys.stderr))
        self.warnings = []
        self._checked = {}

    @classmethod
    def for_run(cls, run_dir, mode: str = "refuse") -> "AlignmentChecker":
        """Thresholds of the run's training pool (``run_dir/aligned/``), else the defaults."""
        return cls(AlignmentThresholds.read(Path(run_dir) / "aligned"), mode)

    def checked(self, scan_path, align: Callable[[], "object"]):
        """``align()`` (an :class:`~ltnet_keras.data.align.Alignment` of the scan at
        ``scan_path``), checked once per scan file: later calls for the unchanged file return
        the same alignment without aligning again."""
        try:
            stat = os.stat(scan_path)
            key = (os.path.abspath(scan_path), stat.st_size, stat.st_mtime_ns)
        except (OSError, TypeError):
            key = None
        if key is not None and key in self._checked:
            return self._checked[key]
        alignment = align()
        notes = []
        if alignment.start != "identity":
            notes.append(f"its header looks turned by half a turn about the {alignment.start} "
                         "axis: the alignment started from that turn")
        warning = check_similarity(scan_path, alignment.similarity, self.thresholds, self.mode)
        for note in notes + ([warning] if warning else []):
            self.warnings.append(f"{scan_path}: {note}")
            self.report(self.warnings[-1])
        if key is not None:
            self._checked[key] = alignment
        return alignment


def record_pool(alignments: Dict[str, "object"], folder=None,
                report: Callable[[str], None] = None) -> AlignmentThresholds:
    """The thresholds of a training pool from its scans' alignments (``{scan path:
    Alignment}``), written to ``folder/alignment_check.json`` when given. Pool scans the
    default thresholds would warn about, or aligned from a half turn, are reported by name."""
    checker = AlignmentChecker(mode="warn", report=report)
    for path, alignment in alignments.items():
        checker.checked(path, lambda: alignment)
    thresholds = AlignmentThresholds.from_pool(
        {subject_id(path): a.similarity for path, a in alignments.items()})
    if folder is not None:
        thresholds.write(folder)
    return thresholds


def half_turned_header(volume: Volume, axis: str) -> Volume:
    """The same voxels with a header turned half a turn about world ``axis`` (x, y or z) about
    the volume's centre: the wrong orientation a header can carry."""
    turn = np.eye(4)
    turn[:3, :3] = HALF_TURNS[axis]
    centre = np.asarray(volume.affine) @ np.append((np.array(volume.shape) - 1) / 2.0, 1.0)
    turn[:3, 3] = centre[:3] - HALF_TURNS[axis] @ centre[:3]
    return Volume(volume.array, turn @ np.asarray(volume.affine, np.float64), volume.header,
                  volume.path)


def not_a_head(like: Volume, kind: str = "blob", seed: int = 0) -> Volume:
    """Something of ``like``'s grid that is no head: ``"blob"``, smooth random noise (6 mm
    features) in an ellipsoid of the head's size, or ``"cube"``, a bright cube phantom."""
    rng = np.random.default_rng(seed)
    shape = like.shape
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    if kind == "cube":
        array = np.all(np.abs(grid) < 0.5, axis=-1).astype(np.float32)
    elif kind == "blob":
        from scipy.ndimage import gaussian_filter
        sigma = 6.0 / np.linalg.norm(np.asarray(like.affine)[:3, :3], axis=0)
        noise = gaussian_filter(rng.standard_normal(shape), sigma)
        inside = np.sum((grid / 0.8) ** 2, -1) < 1.0
        array = (np.maximum(noise - noise.min(), 0) * inside).astype(np.float32)
    else:
        raise ValueError(f"kind must be 'blob' or 'cube', not {kind!r}")
    return Volume(array / max(float(array.max()), 1e-6), np.asarray(like.affine, np.float64),
                  None, like.path)
