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
    """``(start, stop)`` of the box holding every non-zero voxel (empty: both zero):
    :func:`~ltnet_keras.data.preprocess.brain_bbox` of the non-zero mask."""
    from ltnet_keras.data.preprocess import brain_bbox
    nonzero = np.asarray(array) != 0
    if not nonzero.any():
        return np.zeros(3, int), np.zeros(3, int)
    start, stop = brain_bbox(nonzero)
    return np.array(start), np.array(stop)


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


def label_region(field, factor: int, crop_start, offset, labelled_box, atlas_shape,
                 margin: float = 2.0) -> Tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` corners (atlas voxels) of the atlas-grid points that ``field`` can carry
    within ``margin`` voxels of ``labelled_box`` (``(low, high)`` voxel corners): the only
    points whose label look-up can give a label (``Segmenter._labels_through``'s ``region``,
    tighter than its largest-displacement bound).

    ``field`` ``(x, y, z, 3)`` lives on the crop at ``factor`` (block centres at ``crop_start +
    factor * i + (factor - 1) / 2``), interpolated linearly between centres, clamped beyond
    them and 0 outside the crop, as ``field_at_points`` reads it. Inside a cell of 8 centres a
    point plus its field is the same convex combination of the centres' images (the weights
    reproduce linear functions), so it lies in their box; in the clamped rim between the outer
    centres and the crop's edge it is off by less than ``factor`` (the rim's cells are widened
    by that). Outside the crop the field is 0: the labelled box, moved back by the offset.
    """
    field = np.asarray(field, np.float64) * factor
    offset = np.asarray(offset, np.float64)
    low, high = (np.asarray(b, np.float64) - d for b, d in zip(labelled_box, (margin, -margin)))
    size = np.array(field.shape[:3])
    region_low, region_high = low - offset, high - offset
    if np.any(size < 2):   # no cells: the whole crop may carry labels
        edge = np.asarray(crop_start, np.float64)
        region_low = np.minimum(region_low, edge)
        region_high = np.maximum(region_high, edge + factor * size)
    else:
        centres = [crop_start[a] + factor * np.arange(size[a]) + (factor - 1) / 2.0
                   for a in range(3)]
        cells = tuple(size - 1)
        rim = np.zeros(cells, bool)   # cells on the lattice's boundary, next to the rim
        for axis in range(3):
            index = np.arange(cells[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
            rim |= (index == 0) | (index == cells[axis] - 1)
        widen = np.where(rim, float(factor), 0.0)
        hit = np.ones(cells, bool)
        for axis in range(3):
            along = centres[axis].reshape([-1 if a == axis else 1 for a in range(3)])
            lo = hi = along + field[..., axis] + offset[axis]
            for a in range(3):   # min / max over each cell's 8 corners
                head = tuple(slice(0, -1) if b == a else slice(None) for b in range(3))
                tail = tuple(slice(1, None) if b == a else slice(None) for b in range(3))
                lo, hi = np.minimum(lo[head], lo[tail]), np.maximum(hi[head], hi[tail])
            hit &= (hi + widen >= low[axis]) & (lo - widen <= high[axis])
        if hit.any():
            for a in range(3):
                found = np.flatnonzero(hit.any(axis=tuple(b for b in range(3) if b != a)))
                first, last = found[0], found[-1]
                cell_low = crop_start[a] - 0.5 if first == 0 else centres[a][first]
                cell_high = (crop_start[a] + factor * size[a] if last == cells[a] - 1
                             else centres[a][last + 1])
                region_low[a] = min(region_low[a], cell_low)
                region_high[a] = max(region_high[a], cell_high)
    top = np.asarray(atlas_shape, np.float64) - 0.5
    return np.maximum(region_low, -0.5), np.minimum(region_high, top)
