"""Bringing a scan into the atlas' space and its labels back: an affine registration to the
atlas with ANTs (antspyx), on the grids of :mod:`ltnet_keras.data.grids` (reorientation,
resampling; re-exported here).

Conventions. An affine ``A`` maps voxel indices to world millimetres in RAS+ (nibabel's). A
``voxel map`` is a 4x4 matrix taking voxel indices of one grid to (continuous) voxel indices of
another. :class:`Alignment` holds the registration as ``atlas_to_scan``: the world point of the
scan that shows what the atlas shows at a given atlas world point (ANTs' "fixed to moving"
point map), so the scan in atlas space is ``scan(atlas_to_scan(x))`` and a scan voxel looks up
the atlas at the inverse. ANTs itself works in LPS; the conversion happens in this module only.

Alignment does not fail silently: before the affine, the identity start and the three half
turns about the centre of mass are compared (a scan whose header is turned 180 degrees would
otherwise settle upside down or back to front), and every alignment carries a similarity to the
atlas (:func:`alignment_similarity`) that :mod:`ltnet_keras.data.alignment_check` judges.
"""
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ltnet_keras.config import ALIGN_MODES
from ltnet_keras.data.alignment_check import (HALF_TURNS, SIMILARITY_SPACING, START_ITERATIONS,
                                              START_MARGIN, START_SPACING, alignment_similarity,
                                              coarse_similarity, half_turn_start)
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.grids import (axis_codes, registration_image, reorient,  # noqa: F401
                                    resample, resample_volume, voxel_map, voxel_sizes, zoom_grid)
from ltnet_keras.data.io import Volume, load_image, save_volume, subject_id
from ltnet_keras.records import atomic_write_text, read_keyed_record

__all__ = ["ALIGN_MODES", "check_align_mode", "axis_codes", "reorient", "voxel_map",
           "resample", "resample_volume", "zoom_grid", "Alignment", "RegistrationSettings",
           "register_affine", "RegistrationGrids", "to_atlas_space", "AlignmentCache",
           "alignment_similarity"]

# RAS <-> LPS: ANTs/ITK physical points have x and y negated.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_align_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ALIGN_MODES`, else a ValueError listing them."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown alignment {mode!r}; valid: {', '.join(ALIGN_MODES)}")
    return mode


def load_ants():
    """The ``ants`` module, loaded with ONE ITK thread unless the environment variable
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` says otherwise: with its fixed seed the
    registration is then the same bit for bit from run to run (on several threads ITK's
    parallel sums move results by ~0.1 mm), so the same scan always gets the same labels. At
    the 3 mm registration grid one thread costs little."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    import ants
    return ants


def _to_ants(volume: Volume):
    """An ANTsImage of ``volume`` (its RAS affine turned into ITK's LPS origin/direction)."""
    ants = load_ants()
    lps = _RAS_TO_LPS @ np.asarray(volume.affine, np.float64)
    spacing = voxel_sizes(lps)
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32),
                           origin=tuple(float(v) for v in lps[:3, 3]),
                           spacing=tuple(float(v) for v in spacing),
                           direction=direction)


def _matrix_of(transform) -> np.ndarray:
    """4x4 LPS matrix of an ANTs affine transform, read off the images of four points (so it
    does not depend on ITK's parameter layout or centre of rotation)."""
    points = [np.zeros(3)] + [np.eye(3)[i] for i in range(3)]
    images = [np.asarray(transform.apply_to_point(tuple(p)), np.float64) for p in points]
    matrix = np.eye(4)
    matrix[:3, 3] = images[0]
    for i in range(3):
        matrix[:3, i] = images[i + 1] - images[0]
    return matrix


@contextlib.contextmanager
def _ants_seed(seed: int):
    """ANTs reads its random seed from ``ants.config`` (what ``set_ants_deterministic`` sets,
    without that function's switch to one thread)."""
    ants = load_ants()
    previous = ants.config._random_seed
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = previous


@dataclass
class RegistrationSettings:
    """How :func:`register_affine` runs ANTs.

    Registration at ``spacing`` mm (both images smoothed and resampled) with ANTs' own
    multi-resolution ``shrink_factors`` on top; ``transform`` is ANTs' ``type_of_transform``
    ("Affine": rigid + scale + shear after a centre-of-mass translation, "Rigid", "Similarity").
    ``seed`` fixes the metric's sample positions: the result is then the same bit for bit on
    one thread (the default of :func:`load_ants`) and within about 0.1 mm on several, where
    ITK's parallel sums change their order.

    The default budget, 100 iterations on the 3 mm grid shrunk to 6 mm, is what segmentation
    needs: the affine only brings a scan near the atlas, G_F and refinement do the rest. A
    second level of 20 at 3 mm (the default before 2026-12-06, which the committed tables
    used) took 60 % of ANTs' time and moved no Dice: FreeSurfer validation 84.32 with it, 84.35
    without, ANTs 4.8 -> 1.9 s a 256^3 scan (``benchmarks/alignment_budget.py``).
    """
    spacing: float = 3.0
    transform: str = "Affine"
    metric: str = "mattes"
    iterations: Tuple[int, ...] = (100,)
    shrink_factors: Tuple[int, ...] = (2,)
    smoothing_sigmas: Tuple[int, ...] = (1,)
    sampling_rate: float = 0.3
    seed: int = 1

    def __post_init__(self):
        valid = ("Affine", "Rigid", "Similarity")
        if self.transform not in valid:
            raise ValueError(f"unknown registration transform {self.transform!r}; valid: "
                             f"{', '.join(valid)}")
        if not (len(self.iterations) == len(self.shrink_factors) == len(self.smoothing_sigmas)):
            raise ValueError("iterations, shrink_factors and smoothing_sigmas need one entry per "
                             "resolution level")
        if self.spacing <= 0:
            raise ValueError(f"registration spacing must be > 0 mm, not {self.spacing}")
        if int(self.seed) != self.seed or self.seed < 1:
            # ANTs reads --random-seed 0 as "seed from the clock".
            raise ValueError(f"registration seed must be an integer >= 1, not {self.seed}")


@dataclass
class Alignment:
    """An affine registration of a scan to the atlas and the two grids it relates.

    ``atlas_to_scan``: 4x4, atlas world point (RAS mm) -> scan world point showing the same
    anatomy. ``seconds``: time per stage of :func:`register_affine`.
    """
    atlas_to_scan: np.ndarray
    atlas_shape: Tuple[int, int, int]
    atlas_affine: np.ndarray
    scan_shape: Tuple[int, int, int]
    scan_affine: np.ndarray
    seconds: Dict[str, float] = field(default_factory=dict)
    #: NCC of the aligned scan and the atlas (:func:`alignment_similarity`); None if unknown.
    similarity: Optional[float] = None
    #: The start the affine began from: "identity" or the half turn's axis (:data:`HALF_TURNS`).
    start: str = "identity"
    #: Each start's NCC after the quick rigid registration that chose among them.
    start_scores: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def identity(cls, scan: Volume, atlas_shape, atlas_affine) -> "Alignment":
        return cls(np.eye(4), tuple(atlas_shape), np.asarray(atlas_affine, np.float64),
                   scan.shape, np.asarray(scan.affine, np.float64))

    @property
    def atlas_voxel_to_scan_voxel(self) -> np.ndarray:
        return voxel_map(self.scan_affine, self.atlas_affine, self.atlas_to_scan)

    @property
    def scan_voxel_to_atlas_voxel(self) -> np.ndarray:
        return np.linalg.inv(self.atlas_voxel_to_scan_voxel)

    def scan_box(self, region=None, margin: int = 2) -> Tuple[np.ndarray, np.ndarray]:
        """``(start, stop)`` of the scan voxels whose atlas position can fall in ``region``
        (``(low, high)`` corners in atlas voxels; default the whole atlas grid): the region's
        corners mapped into the scan, widened by ``margin``, clipped to the scan."""
        if region is None:
            region = (np.full(3, -0.5), np.asarray(self.atlas_shape) - 0.5)
        low, high = (np.asarray(r, np.float64) for r in region)
        corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1])
                            for z in (low[2], high[2])])
        mapped = (self.atlas_voxel_to_scan_voxel @ corners.T).T[:, :3]
        start = np.clip(np.floor(mapped.min(0)).astype(int) - margin, 0, self.scan_shape)
        stop = np.clip(np.ceil(mapped.max(0)).astype(int) + margin + 1, 0, self.scan_shape)
        return start, np.maximum(stop, start)

    def to_dict(self) -> dict:
        return {"atlas_to_scan": self.atlas_to_scan.tolist(),
                "atlas_shape": list(self.atlas_shape), "atlas_affine": self.atlas_affine.tolist(),
                "scan_shape": list(self.scan_shape), "scan_affine": self.scan_affine.tolist(),
                "seconds": dict(self.seconds), "similarity": self.similarity,
                "start": self.start, "start_scores": dict(self.start_scores)}

    @classmethod
    def from_dict(cls, data: dict) -> "Alignment":
        # Records written before the start search and the similarity lack both.
        return cls(np.asarray(data["atlas_to_scan"], np.float64), tuple(data["atlas_shape"]),
                   np.asarray(data["atlas_affine"], np.float64), tuple(data["scan_shape"]),
                   np.asarray(data["scan_affine"], np.float64), dict(data.get("seconds", {})),
                   data.get("similarity"), data.get("start", "identity"),
                   dict(data.get("start_scores", {})))


def _write_ants_affine(atlas_to_scan, folder) -> str:
    """``atlas_to_scan`` as an ANTs transform file (an ``initial_transform``)."""
    ants = load_ants()
    lps = _RAS_TO_LPS @ atlas_to_scan @ _RAS_TO_LPS
    path = str(Path(folder) / f"start_{len(os.listdir(folder))}.mat")
    ants.write_transform(ants.create_ants_transform(
        "AffineTransform", matrix=lps[:3, :3], offset=lps[:3, 3]), path)
    return path


def _choose_start(fixed: Volume, moving: Volume, fine: Tuple[Volume, Volume], settings,
                  folder) -> Tuple[str, Dict]:
    """The half turn (or none) to start the affine from, and each start's similarity (as
    :func:`alignment_similarity` measures it) after a quick rigid registration at
    :data:`START_SPACING` mm."""
    ants = load_ants()
    codes = axis_codes(fixed.affine)
    spacing = max(START_SPACING, settings.spacing)
    fixed, moving = (registration_image(v, codes, spacing) for v in (fixed, moving))
    scores = {}
    for turn in HALF_TURNS:
        start = half_turn_start(turn, fixed, moving)
        try:
            with _ants_seed(settings.seed):
                result = ants.registration(
                    _to_ants(fixed), _to_ants(moving), type_of_transform="Rigid",
                    initial_transform=[_write_ants_affine(start, folder)],
                    outprefix=os.path.join(folder, f"start_{turn}_"),
                    aff_metric=settings.metric, aff_sampling=32,
                    aff_random_sampling_rate=settings.sampling_rate,
                    aff_iterations=(START_ITERATIONS,), aff_shrink_factors=(1,),
                    aff_smoothing_sigmas=(0,))
            start = _RAS_TO_LPS @ _matrix_of(ants.read_transform(
                result["fwdtransforms"][0])) @ _RAS_TO_LPS
        except (RuntimeError, IndexError):
            pass   # too little to register at this grid: score the start as it is
        scores[turn] = coarse_similarity(*fine, start, overlap=True)
    best = max(scores, key=scores.get)
    if scores[best] < scores["identity"] + START_MARGIN:
        best = "identity"
    return best, scores


@dataclass(frozen=True)
class RegistrationGrids:
    """An atlas as every registration to it reads it: reoriented to its own axes (``codes``)
    and down-sampled to the registration's ``spacing`` (``image``) and to the similarity's
    grid (``fine``). A segmenter makes them once, not once per scan."""
    codes: Tuple[str, ...]
    spacing: float
    image: Volume
    fine: Volume

    @classmethod
    def of(cls, atlas: Volume, spacing: float) -> "RegistrationGrids":
        codes = tuple(axis_codes(atlas.affine))
        image = registration_image(atlas, codes, spacing)
        fine = (image if spacing == SIMILARITY_SPACING else
                registration_image(atlas, codes, SIMILARITY_SPACING))
        return cls(codes, float(spacing), image, fine)


def register_affine(scan: Volume, atlas: Volume, settings: Optional[RegistrationSettings] = None,
                    search_start: bool = True,
                    atlas_grids: Optional[RegistrationGrids] = None) -> Alignment:
    """Affine registration of ``scan`` (moving) to ``atlas`` (fixed) with ANTs.

    Both are reoriented to the atlas' axes and resampled to ``settings.spacing`` mm first: the
    registration does not need 1 mm detail and runs several times faster on the coarse grid.
    The start is the translation that aligns the centres of mass (ANTs' default), turned by
    half a turn about an axis when that fits clearly better (:func:`_choose_start`): heads far
    from the atlas' position, with other fields of view or with a header turned 180 degrees
    need no manual start (``search_start=False``: ANTs' start only, as before the search).
    The result carries its :func:`alignment_similarity`. ``atlas_grids``: the atlas' side
    made ahead (:meth:`RegistrationGrids.of` the atlas at ``settings.spacing``).
    """
    ants = load_ants()
    settings = settings or RegistrationSettings()
    seconds = {}
    clock = time.perf_counter()
    atlas_grids = atlas_grids or RegistrationGrids.of(atlas, settings.spacing)
    if atlas_grids.spacing != settings.spacing:
        raise ValueError(f"the atlas' registration grids are at {atlas_grids.spacing} mm, the "
                         f"registration at {settings.spacing} mm")
    codes, fixed_image = atlas_grids.codes, atlas_grids.image
    moving_image = registration_image(scan, codes, settings.spacing)
    # The similarity's own grid, from the scans (not from a coarser registration grid's blur).
    fine = (atlas_grids.fine, moving_image if settings.spacing == SIMILARITY_SPACING else
            registration_image(scan, codes, SIMILARITY_SPACING))
    seconds["registration_resample"] = time.perf_counter() - clock

    try:
        with tempfile.TemporaryDirectory(prefix="ltnet_align_") as folder:
            clock = time.perf_counter()
            start, scores = (_choose_start(fixed_image, moving_image, fine, settings, folder)
                             if search_start else ("identity", {}))
            # The usual orientation keeps ANTs' own start: the same registration as before.
            initial = None if start == "identity" else [_write_ants_affine(
                half_turn_start(start, fixed_image, moving_image), folder)]
            seconds["registration_start"] = time.perf_counter() - clock
            clock = time.perf_counter()
            with _ants_seed(settings.seed):
                result = ants.registration(
                    _to_ants(fixed_image), _to_ants(moving_image),
                    type_of_transform=settings.transform, initial_transform=initial,
                    # Its own folder: antspyx globs the prefix's folder for the outputs, and
                    # the default (the system's temporary folder) can hold thousands of files.
                    outprefix=os.path.join(folder, "scan_to_atlas_"),
                    aff_metric=settings.metric, aff_sampling=32,
                    aff_random_sampling_rate=settings.sampling_rate,
                    aff_iterations=tuple(settings.iterations),
                    aff_shrink_factors=tuple(settings.shrink_factors),
                    aff_smoothing_sigmas=tuple(settings.smoothing_sigmas))
            transform = ants.read_transform(result["fwdtransforms"][0])
    except (RuntimeError, IndexError) as error:
        raise VolumeError(scan.path, f"ANTs could not register the scan to the atlas "
                                     f"({type(error).__name__}: {error})") from error
    seconds["registration_ants"] = time.perf_counter() - clock
    atlas_to_scan = _RAS_TO_LPS @ _matrix_of(transform) @ _RAS_TO_LPS
    if not np.all(np.isfinite(atlas_to_scan)) or abs(np.linalg.det(atlas_to_scan[:3, :3])) < 1e-3:
        raise VolumeError(scan.path, "the affine registration to the atlas failed (degenerate "
                                     f"transform {atlas_to_scan.tolist()})")
    clock = time.perf_counter()
    similarity = coarse_similarity(*fine, atlas_to_scan, overlap=True)
    seconds["registration_similarity"] = time.perf_counter() - clock
    return Alignment(atlas_to_scan, atlas.shape, np.asarray(atlas.affine, np.float64),
                     scan.shape, np.asarray(scan.affine, np.float64), seconds, similarity, start,
                     scores)


def to_atlas_space(scan: Volume, alignment: Alignment, kind: str = "image") -> Volume:
    """The scan on the atlas grid: one interpolation from the scan's own voxels."""
    return Volume(resample(scan.array, alignment.atlas_voxel_to_scan_voxel, alignment.atlas_shape,
                           kind), alignment.atlas_affine.copy(), None, scan.path)


class AlignmentCache:
    """Alignments to the atlas kept in ``folder`` (``<id>.json``, and with
    :meth:`aligned_image` the scan in atlas space, ``<id>.nii.gz``), reused while the scan
    file, the atlas and the registration settings stay the same."""

    def __init__(self, folder, settings: Optional[RegistrationSettings] = None):
        self.folder = Path(folder)
        self.settings = settings or RegistrationSettings()

    def _key(self, scan_path, atlas: Volume) -> dict:
        stat = os.stat(scan_path)
        key = {"scan": str(Path(scan_path).resolve()), "size": stat.st_size,
               "mtime_ns": stat.st_mtime_ns, "atlas": str(Path(atlas.path).resolve()),
               "settings": dataclasses.asdict(self.settings)}
        return json.loads(json.dumps(key))   # tuples as lists, as read back from JSON

    def _paths(self, scan_path) -> Tuple[Path, Path]:
        sid = subject_id(scan_path)
        return self.folder / f"{sid}.json", self.folder / f"{sid}.nii.gz"

    def _cached(self, scan_path, atlas: Volume) -> Optional[Alignment]:
        record_path, _ = self._paths(scan_path)
        record = read_keyed_record(record_path, self._key(scan_path, atlas))
        return None if record is None else Alignment.from_dict(record["alignment"])

    def _keep(self, scan_path, atlas: Volume, alignment: Alignment) -> None:
        record_path, _ = self._paths(scan_path)
        atomic_write_text(record_path, json.dumps(
            {"key": self._key(scan_path, atlas), "alignment": alignment.to_dict()}, indent=2))

    def alignment(self, scan: Volume, atlas: Volume) -> Alignment:
        """The kept alignment of ``scan`` if still valid, else a new registration (kept). A
        record from before similarities were kept gets its similarity now (and keeps it)."""
        clock = time.perf_counter()
        cached = self._cached(scan.path, atlas)
        if cached is None:
            alignment = register_affine(scan, atlas, self.settings)
            self._keep(scan.path, atlas, alignment)
            return alignment
        if cached.similarity is None:
            cached.similarity = alignment_similarity(scan, atlas, cached.atlas_to_scan)
            self._keep(scan.path, atlas, cached)
        cached.seconds = {"registration_cached": time.perf_counter() - clock}
        return cached

    def aligned(self, scan_path, atlas: Volume) -> Tuple[Volume, Alignment]:
        """The scan (a file) on the atlas grid, resampled once and kept as NIfTI, and its
        alignment (with its similarity)."""
        _, image_path = self._paths(scan_path)
        cached = self._cached(scan_path, atlas)
        if image_path.exists() and cached is not None and cached.similarity is not None:
            image = load_image(image_path)
            return Volume(image.array, image.affine, None, str(scan_path)), cached
        scan = load_image(scan_path)
        alignment = self.alignment(scan, atlas)
        aligned = to_atlas_space(scan, alignment)
        save_volume(aligned.array, image_path, aligned.affine)
        return aligned, alignment

    def aligned_image(self, scan_path, atlas: Volume) -> Volume:
        return self.aligned(scan_path, atlas)[0]
