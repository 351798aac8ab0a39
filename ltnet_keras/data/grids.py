"""Voxel grids in the world: reorientation, voxel maps between grids, resampling and the
coarse straight grids registrations run on (the geometry under :mod:`ltnet_keras.data.align`).

An affine ``A`` maps voxel indices to world millimetres in RAS+ (nibabel's). A ``voxel map`` is
a 4x4 matrix taking voxel indices of one grid to (continuous) voxel indices of another.
"""
from typing import Sequence, Tuple

import numpy as np
from nibabel import orientations

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import Volume

__all__ = ["axis_codes", "reorient", "voxel_map", "resample", "resample_volume", "voxel_sizes",
           "zoom_grid", "registration_image"]


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


# A scan is refused when, along any world axis, it covers less than this fraction of the
# atlas' field of view: the network was trained on whole heads cropped to the atlas' extent,
# and a slab or a thumbnail cannot be registered to it (it would still get a label map, made
# of atlas labels warped into padding). Whole-head scans of any usual resolution pass.
MIN_FIELD_OF_VIEW_FRACTION = 0.5


def check_field_of_view(image: Volume, atlas: Volume) -> None:
    """Refuse a scan that covers less than :data:`MIN_FIELD_OF_VIEW_FRACTION` of the atlas'
    field of view along a world axis; the message gives both shapes, voxel sizes and fields
    of view (mm)."""
    fov, atlas_fov = np.array(image.field_of_view), np.array(atlas.field_of_view)
    short = fov < MIN_FIELD_OF_VIEW_FRACTION * atlas_fov
    if short.any():
        def describe(volume, extent):
            size = " x ".join(f"{v:.3g}" for v in volume.voxel_size)
            return (f"shape {volume.shape}, voxel size {size} mm, field of view "
                    + " x ".join(f"{v:.1f}" for v in extent) + " mm")
        axes = ", ".join("xyz"[axis] for axis in np.flatnonzero(short))
        raise VolumeError(image.path, f"the scan is too small for this run: {describe(image, fov)}"
                                      f" covers less than {MIN_FIELD_OF_VIEW_FRACTION:g} of the "
                                      f"atlas' field of view along world axis {axes} (atlas "
                                      f"{atlas.path}: {describe(atlas, atlas_fov)})")
