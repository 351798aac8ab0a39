"""One scan in several atlases' spaces, cheaply (issue 28): the pieces of the multi-atlas fast
path (:class:`ltnet_keras.inference.multi_atlas.MultiAtlasSegmenter`, ``fast=True``).

* :func:`compose`: the scan is registered to the first atlas only; every other atlas was
  registered to the first one ahead of time, and scan -> atlas k is the composition.
* :func:`nonzero_box`, :func:`to_atlas_space_box`: a skull-stripped scan is zero outside its
  brain, so on the atlas grid it can be non-zero only where its non-zero box lands; only that
  box is interpolated (the rest is exactly 0, as the whole-grid resampling gives it).
* :func:`ranking_similarity`: the atlases are ranked (majority vote's tie-break) by the Pearson
  correlation of the scan and the warped atlas on the grid the field lives on (refinement's
  finest, or the network's), within the crop, instead of warping every atlas at 1 mm.
"""
from typing import Tuple

import numpy as np

from ltnet_keras.data.align import Alignment
from ltnet_keras.data.io import Volume


def compose(scan_to_first: Alignment, first_to_atlas: Alignment) -> Alignment:
    """Scan -> atlas k through the first atlas: ``scan_to_first`` registers the scan to the
    first atlas, ``first_to_atlas`` the first atlas (as the moving image) to atlas k. World
    points: atlas k -> first atlas -> scan. No similarity (it is the first atlas' to judge)."""
    if tuple(first_to_atlas.scan_shape) != tuple(scan_to_first.atlas_shape) or not np.allclose(
            first_to_atlas.scan_affine, scan_to_first.atlas_affine):
        raise ValueError("first_to_atlas must have the first atlas (scan_to_first's atlas) as "
                         "its moving image")
    return Alignment(scan_to_first.atlas_to_scan @ first_to_atlas.atlas_to_scan,
                     tuple(first_to_atlas.atlas_shape), first_to_atlas.atlas_affine.copy(),
                     tuple(scan_to_first.scan_shape), scan_to_first.scan_affine.copy(),
                     start="composed")


def nonzero_box(array) -> Tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` of the box holding every non-zero voxel (empty: both zero)."""
    array = np.asarray(array)
    start, stop = np.zeros(3, int), np.zeros(3, int)
    for axis in range(3):
        hit = np.flatnonzero(np.any(array != 0, axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return np.zeros(3, int), np.zeros(3, int)
        start[axis], stop[axis] = hit[0], hit[-1] + 1
    return start, stop


def atlas_box(alignment: Alignment, scan_box) -> Tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` of the atlas voxels whose trilinear look-up in the scan can touch a
    voxel of ``scan_box`` (scan voxels; outside it the scan is 0): the box widened by one scan
    voxel, its corners mapped onto the atlas grid, plus a voxel for rounding."""
    low, high = (np.asarray(b, np.float64) for b in scan_box)
    if np.any(high <= low):
        return np.zeros(3, int), np.zeros(3, int)
    low, high = low - 1.0, high   # a trilinear neighbour of the box: within one voxel of it
    corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1])
                        for z in (low[2], high[2])])
    mapped = (alignment.scan_voxel_to_atlas_voxel @ corners.T).T[:, :3]
    shape = np.asarray(alignment.atlas_shape)
    start = np.clip(np.floor(mapped.min(0)).astype(int) - 1, 0, shape)
    stop = np.clip(np.ceil(mapped.max(0)).astype(int) + 2, 0, shape)
    return start, np.maximum(stop, start)


def to_atlas_space_box(scan: Volume, alignment: Alignment, scan_box=None,
                       with_box: bool = False):
    """:func:`ltnet_keras.data.align.to_atlas_space` (trilinear, 0 beyond the scan) computed
    only in :func:`atlas_box` of the scan's non-zero box (``scan_box``, default measured): the
    same values up to float rounding of the sample positions, exactly 0 elsewhere. With
    ``with_box``: ``(volume, (start, stop))``, the box on the atlas grid."""
    from scipy.ndimage import affine_transform
    scan_box = nonzero_box(scan.array) if scan_box is None else scan_box
    start, stop = atlas_box(alignment, scan_box)
    out = np.zeros(alignment.atlas_shape, np.float32)
    if np.all(stop > start):
        matrix = alignment.atlas_voxel_to_scan_voxel
        offset = matrix[:3, :3] @ start + matrix[:3, 3]
        out[tuple(slice(a, b) for a, b in zip(start, stop))] = affine_transform(
            np.asarray(scan.array).astype(np.float32, copy=False), matrix[:3, :3], offset,
            output_shape=tuple(int(n) for n in stop - start), order=1, mode="grid-constant",
            cval=0, prefilter=False)
    volume = Volume(out, alignment.atlas_affine.copy(), None, scan.path)
    return (volume, (start, stop)) if with_box else volume


def normalised_crop(array: np.ndarray, box, grid, upper_percentile: float = 99.9,
                    source="") -> np.ndarray:
    """``grid.crop(normalise_intensity(array))`` for an ``array`` that is 0 outside ``box``
    (``(start, stop)``, as :func:`to_atlas_space_box` makes it): the minimum and the percentile
    of the whole grid are read off the box's values and the count of zeros around it, and only
    the crop is normalised. Falls back to the whole grid when that does not hold (negative
    values, no zeros outside, the percentile among the zeros)."""
    from ltnet_keras.data.preprocess import normalise_intensity
    values = array[tuple(slice(a, b) for a, b in zip(*box))]
    outside = array.size - values.size
    if values.size == 0 or outside == 0 or not np.all(np.isfinite(values)) or values.min() < 0:
        return grid.crop(normalise_intensity(array, upper_percentile, source))
    # The sorted grid is ``outside`` zeros, then the box's sorted values: the percentile's
    # position among all voxels, moved past the zeros, is a position among the box's values.
    position = upper_percentile / 100.0 * (array.size - 1) - outside
    if position < 0 or values.size == 1:
        return grid.crop(normalise_intensity(array, upper_percentile, source))
    low, high = 0.0, float(np.percentile(values, 100.0 * position / (values.size - 1)))
    if high <= low:
        return grid.crop(normalise_intensity(array, upper_percentile, source))   # raises
    crop = grid.crop(array).astype(np.float32, copy=False)
    return np.clip((crop - low) / (high - low), 0.0, 1.0).astype(np.float32)


def ranking_similarity(atlas_crop: np.ndarray, target_crop: np.ndarray, field: np.ndarray,
                       factor: int) -> float:
    """Pearson correlation of the target's crop and the atlas' crop warped by ``field``, both
    block-averaged by ``factor`` (the field's grid): ``warped(i) = atlas(i + field(i))`` (pull,
    in voxels of that grid, as :func:`~ltnet_keras.inference.refine.refine_field` compares
    them). NaN for a constant image."""
    from scipy.ndimage import map_coordinates

    from ltnet_keras.data.atlas import _ncc
    from ltnet_keras.inference.refine import downsample_image
    atlas, target = downsample_image(atlas_crop, factor), downsample_image(target_crop, factor)
    field = np.asarray(field, np.float32)
    if field.shape[:3] != target.shape:
        raise ValueError(f"field {field.shape[:3]} is not on the crop's grid {target.shape} at "
                         f"factor {factor}")
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in target.shape], indexing="ij")
    coords = np.stack([g + field[..., i] for i, g in enumerate(grid)])
    warped = map_coordinates(atlas, coords, order=1, mode="nearest")
    return _ncc(warped.astype(np.float64), target.astype(np.float64))
