"""Bringing a scan into the atlas' space and its labels back: reorientation, resampling and an
affine registration to the atlas with ANTs (antspyx).

Conventions. An affine ``A`` maps voxel indices to world millimetres in RAS+ (nibabel's). A
``voxel map`` is a 4x4 matrix taking voxel indices of one grid to (continuous) voxel indices of
another. :class:`Alignment` holds the registration as ``atlas_to_scan``: the world point of the
scan that shows what the atlas shows at a given atlas world point (ANTs' "fixed to moving"
point map), so the scan in atlas space is ``scan(atlas_to_scan(x))`` and a scan voxel looks up
the atlas at the inverse. ANTs itself works in LPS; the conversion happens in this module only.
"""
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from nibabel import orientations

from ltnet_keras.config import ALIGN_MODES
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import Volume, load_image, save_volume, subject_id
from ltnet_keras.records import atomic_write_text, read_keyed_record

__all__ = ["ALIGN_MODES", "check_align_mode", "axis_codes", "reorient", "voxel_map",
           "resample", "resample_volume", "zoom_grid", "Alignment", "RegistrationSettings",
           "register_affine", "to_atlas_space", "AlignmentCache"]

# RAS <-> LPS: ANTs/ITK physical points have x and y negated.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_align_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ALIGN_MODES`, else a ValueError listing them."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown alignment {mode!r}; valid: {', '.join(ALIGN_MODES)}")
    return mode


def axis_codes(affine) -> Tuple[str, str, str]:
    """The direction each voxel axis points to, e.g. ``("L", "P", "S")`` (nibabel's codes)."""
    return tuple(orientations.aff2axcodes(np.asarray(affine)))


def reorient(volume: Volume, codes: Sequence[str]) -> Volume:
    """The same voxels with their axes permuted and flipped to point along ``codes``; the
    affine changes with them, so every voxel keeps its world position (no interpolation)."""
    current = orientations.io_orientation(volume.affine)
    wanted = orientations.axcodes2ornt(tuple(codes))
    transform = orientations.ornt_transform(current, wanted)
    array = orientations.apply_orientation(volume.array, transform)
    affine = volume.affine @ orientations.inv_ornt_aff(transform, volume.array.shape)
    return Volume(np.ascontiguousarray(array), affine, None, volume.path)


def voxel_map(source_affine, target_affine, world_transform=None) -> np.ndarray:
    """4x4 matrix taking target voxels to source voxels: ``inv(source) @ T @ target``, where
    ``T`` (identity if None) maps target world points to the source world points they show."""
    world = np.eye(4) if world_transform is None else np.asarray(world_transform, np.float64)
    return np.linalg.inv(np.asarray(source_affine, np.float64)) @ world @ np.asarray(
        target_affine, np.float64)


def resample(array, target_to_source, target_shape, kind: str = "image") -> np.ndarray:
    """``array`` sampled at ``target_to_source @ t`` for every voxel ``t`` of ``target_shape``:
    trilinear for ``"image"`` (float32), nearest for ``"label"`` (same dtype); beyond the
    source's voxels (each reaching half a voxel past its centre) is 0 (background)."""
    from scipy.ndimage import affine_transform
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', not {kind!r}")
    matrix = np.asarray(target_to_source, np.float64)
    array = np.asarray(array)
    source = array.astype(np.float32, copy=False) if kind == "image" else array
    out = affine_transform(source, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(target_shape),
                           order=1 if kind == "image" else 0, mode="grid-constant", cval=0,
                           prefilter=False)
    return out if kind == "image" else out.astype(array.dtype, copy=False)


def resample_volume(volume: Volume, target_shape, target_affine, kind: str = "image",
                    world_transform=None) -> Volume:
    """``volume`` on another grid (``target_shape``, ``target_affine``), optionally moved by
    ``world_transform`` (target world -> source world), in one interpolation."""
    matrix = voxel_map(volume.affine, target_affine, world_transform)
    return Volume(resample(volume.array, matrix, target_shape, kind),
                  np.asarray(target_affine, np.float64), None, volume.path)


def voxel_sizes(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)


def zoom_grid(shape, affine, spacing: float) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """A grid of ``spacing`` mm voxels along the same axes and covering the same field of view:
    its voxel 0 is centred where the first block of the old grid would be centred."""
    shape = np.asarray(shape)
    affine = np.asarray(affine, np.float64)
    sizes = voxel_sizes(affine)
    scale = spacing / sizes                       # new voxel in old voxels, per axis
    new_shape = np.maximum(np.ceil(shape / scale).astype(int), 1)
    to_old = np.diag(list(scale) + [1.0])
    to_old[:3, 3] = (scale - 1.0) / 2.0
    return tuple(int(n) for n in new_shape), affine @ to_old


def _smooth_for(spacing: float, volume: Volume) -> np.ndarray:
    """Gaussian anti-aliasing before down-sampling to ``spacing`` mm (sigma in voxels)."""
    from scipy.ndimage import gaussian_filter
    ratio = spacing / voxel_sizes(volume.affine)
    # A Gaussian that keeps frequencies the coarse grid can hold: FWHM ~ the ratio.
    sigma = np.where(ratio > 1.0, np.sqrt(np.maximum(ratio ** 2 - 1.0, 0.0)) / 2.355, 0.0)
    return gaussian_filter(volume.array.astype(np.float32), sigma, mode="constant", truncate=3.0)


def _block_mean(array, factors) -> np.ndarray:
    """Mean over ``factors`` blocks (zero-padded at the far end), float32."""
    factors = tuple(int(f) for f in factors)
    padded_shape = [-(-n // f) * f for n, f in zip(array.shape, factors)]
    padded = np.zeros(padded_shape, np.float32)
    padded[tuple(slice(0, n) for n in array.shape)] = array
    blocks = padded.reshape(padded_shape[0] // factors[0], factors[0],
                            padded_shape[1] // factors[1], factors[1],
                            padded_shape[2] // factors[2], factors[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _straight_affine(codes, spacing: float, origin) -> np.ndarray:
    """``spacing`` mm voxels whose axes point exactly along the world axes named by ``codes``."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (world_axis, flip) in enumerate(orientations.axcodes2ornt(tuple(codes))):
        affine[int(world_axis), axis] = flip * spacing
    affine[:3, 3] = origin
    return affine


def registration_image(volume: Volume, codes: Sequence[str], spacing: float) -> Volume:
    """The scan as ANTs registers it: reoriented to ``codes`` (exact), down-sampled to
    ``spacing`` mm voxels along those axes, with axes exactly along the world axes (so ITK gets
    an orthonormal direction matrix even from an oblique or sheared scan)."""
    reoriented = reorient(volume, codes)
    shape, affine = zoom_grid(reoriented.shape, reoriented.affine, spacing)
    straight = _straight_affine(codes, spacing, affine[:3, 3])
    ratio = spacing / voxel_sizes(reoriented.affine)
    factors = np.round(ratio)
    if np.allclose(affine, straight, atol=1e-4) and np.allclose(ratio, factors, atol=1e-3):
        # Whole voxels per block on straight axes (any 1 mm scan, for instance): a block mean
        # is the exact anti-aliased down-sampling, and far quicker than filtering.
        return Volume(_block_mean(reoriented.array, factors), straight, None, volume.path)
    smoothed = Volume(_smooth_for(spacing, reoriented), reoriented.affine, None, volume.path)
    return resample_volume(smoothed, shape, straight, "image")


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
    """
    spacing: float = 3.0
    transform: str = "Affine"
    metric: str = "mattes"
    iterations: Tuple[int, ...] = (100, 20)
    shrink_factors: Tuple[int, ...] = (2, 1)
    smoothing_sigmas: Tuple[int, ...] = (1, 0)
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
                "seconds": dict(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict) -> "Alignment":
        return cls(np.asarray(data["atlas_to_scan"], np.float64), tuple(data["atlas_shape"]),
                   np.asarray(data["atlas_affine"], np.float64), tuple(data["scan_shape"]),
                   np.asarray(data["scan_affine"], np.float64), dict(data.get("seconds", {})))


def register_affine(scan: Volume, atlas: Volume,
                    settings: Optional[RegistrationSettings] = None) -> Alignment:
    """Affine registration of ``scan`` (moving) to ``atlas`` (fixed) with ANTs.

    Both are reoriented to the atlas' axes and resampled to ``settings.spacing`` mm first: the
    registration does not need 1 mm detail and runs several times faster on the coarse grid.
    ANTs starts from the translation that aligns the centres of mass (its default), so heads
    far from the atlas' position and scans with other fields of view need no manual start.
    """
    ants = load_ants()
    settings = settings or RegistrationSettings()
    seconds = {}
    clock = time.perf_counter()
    codes = axis_codes(atlas.affine)
    fixed = _to_ants(registration_image(atlas, codes, settings.spacing))
    moving = _to_ants(registration_image(scan, codes, settings.spacing))
    seconds["registration_resample"] = time.perf_counter() - clock

    clock = time.perf_counter()
    try:
        with _ants_seed(settings.seed):
            result = ants.registration(
                fixed, moving, type_of_transform=settings.transform,
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
    return Alignment(atlas_to_scan, atlas.shape, np.asarray(atlas.affine, np.float64),
                     scan.shape, np.asarray(scan.affine, np.float64), seconds)


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

    def alignment(self, scan: Volume, atlas: Volume) -> Alignment:
        """The kept alignment of ``scan`` if still valid, else a new registration (kept)."""
        clock = time.perf_counter()
        cached = self._cached(scan.path, atlas)
        if cached is not None:
            cached.seconds = {"registration_cached": time.perf_counter() - clock}
            return cached
        alignment = register_affine(scan, atlas, self.settings)
        record_path, _ = self._paths(scan.path)
        atomic_write_text(record_path, json.dumps(
            {"key": self._key(scan.path, atlas), "alignment": alignment.to_dict()}, indent=2))
        return alignment

    def aligned_image(self, scan_path, atlas: Volume) -> Volume:
        """The scan (a file) on the atlas grid, resampled once and kept as NIfTI."""
        _, image_path = self._paths(scan_path)
        if image_path.exists() and self._cached(scan_path, atlas) is not None:
            aligned = load_image(image_path)
            return Volume(aligned.array, aligned.affine, None, str(scan_path))
        scan = load_image(scan_path)
        aligned = to_atlas_space(scan, self.alignment(scan, atlas))
        save_volume(aligned.array, image_path, aligned.affine)
        return aligned
