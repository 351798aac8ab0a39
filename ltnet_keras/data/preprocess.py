"""Intensity normalisation and the mapping between a volume's original grid and the network grid.

The network grid is a crop (or zero-padding, where the crop reaches outside the volume) of
``crop_shape`` voxels starting at ``crop_start`` on the original grid, down-sampled by an integer
``factor``: network voxel ``i`` covers original voxels ``[start + i*f, start + (i+1)*f)``, so its
centre lies at original voxel coordinate ``start + i*f + (f - 1) / 2``.
"""
from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np

from ltnet_keras.data.errors import VolumeError

__all__ = ["normalise_intensity", "brain_bbox", "check_network_shape", "GridSpec"]

UNET_POOLINGS = 4


def normalise_intensity(array, upper_percentile: float = 99.9, source="") -> np.ndarray:
    """Map the minimum to 0 and the ``upper_percentile`` to 1, clipping above: float32 in [0, 1].

    An image that cannot be normalised (NaN/inf, or constant such as all zeros) raises a
    :class:`VolumeError` (a ValueError) whose message starts with ``source``, the image's file.
    """
    array = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise VolumeError(source, "cannot normalise an image with NaN or infinite voxels")
    low = float(array.min())
    high = float(np.percentile(array, upper_percentile))
    if high <= low:
        raise VolumeError(source, f"cannot normalise intensities: the image is constant (its "
                                  f"minimum equals its {upper_percentile}th percentile, {low})")
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def brain_bbox(array, threshold: float = 0.01) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(start, stop)`` of the box around voxels above ``threshold`` times the maximum of the
    ``(x, y, z)`` image or mask (``stop`` exclusive)."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        foreground = array
    else:
        foreground = array > threshold * float(array.max())
    if not foreground.any():
        raise ValueError("cannot find the brain: no voxel of the image or mask is above the "
                         "threshold")
    # The box from the projections on each axis: the same box as the extremes of
    # np.argwhere, without listing every foreground voxel (a third of segment's reading time).
    start, stop = [], []
    for axis in range(foreground.ndim):
        others = tuple(a for a in range(foreground.ndim) if a != axis)
        occupied = np.flatnonzero(foreground.any(axis=others))
        start.append(int(occupied[0]))
        stop.append(int(occupied[-1]) + 1)
    return tuple(start), tuple(stop)


def check_network_shape(shape, divisor: int = 16) -> Tuple[int, ...]:
    """Fail clearly unless every dimension of the network input is a positive multiple of
    ``divisor`` (the U-Net pools 4 times, halving the grid each time: 2**4 = 16)."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 or s % divisor for s in shape):
        raise ValueError(f"network input shape {shape} must be divisible by {divisor} in every "
                         f"dimension because the U-Net has {UNET_POOLINGS} poolings that each "
                         "halve it; choose a crop shape and down-sampling factor whose quotient "
                         f"is a multiple of {divisor}")
    return shape


def _triple(values, name) -> Tuple[int, int, int]:
    values = tuple(values)
    if len(values) != 3 or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be three integers, not {values}")
    return tuple(int(v) for v in values)


@dataclass
class GridSpec:
    """Original grid ``original_shape`` -> network grid ``crop_shape // factor``.

    ``crop_start`` may be negative and the crop may extend past the volume: that part is padding.
    """
    original_shape: Tuple[int, int, int]
    crop_start: Tuple[int, int, int]
    crop_shape: Tuple[int, int, int]
    factor: int = 1

    def __post_init__(self):
        self.original_shape = _triple(self.original_shape, "original_shape")
        self.crop_start = _triple(self.crop_start, "crop_start")
        self.crop_shape = _triple(self.crop_shape, "crop_shape")
        if int(self.factor) != self.factor or self.factor < 1:
            raise ValueError(f"down-sampling factor must be an integer >= 1, not {self.factor}")
        self.factor = int(self.factor)
        if min(self.original_shape) < 1 or min(self.crop_shape) < 1:
            raise ValueError("original and crop shapes must be positive")
        if any(c % self.factor for c in self.crop_shape):
            raise ValueError(f"crop shape {self.crop_shape} is not divisible by the down-sampling "
                             f"factor {self.factor}")

    @classmethod
    def centred_on(cls, mask_or_image, crop_shape, factor: int = 1, threshold: float = 0.01,
                   divisor: int = 16) -> "GridSpec":
        """A crop of ``crop_shape`` centred on the brain's bounding box (see :func:`brain_bbox`);
        the resulting network shape is checked against ``divisor`` (1 skips the check)."""
        array = np.asarray(mask_or_image)
        start, stop = brain_bbox(array, threshold)
        crop_shape = _triple(crop_shape, "crop_shape")
        crop_start = tuple((a + b - c) // 2 for a, b, c in zip(start, stop, crop_shape))
        spec = cls(array.shape[:3], crop_start, crop_shape, factor)
        check_network_shape(spec.network_shape, divisor)
        return spec

    @property
    def network_shape(self) -> Tuple[int, int, int]:
        return tuple(c // self.factor for c in self.crop_shape)

    def to_dict(self) -> dict:
        """Plain ints and lists, ready for JSON or YAML."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "GridSpec":
        missing = {"original_shape", "crop_start", "crop_shape"} - set(data)
        if missing:
            raise ValueError(f"grid spec lacks {sorted(missing)}")
        return cls(data["original_shape"], data["crop_start"], data["crop_shape"],
                   data.get("factor", 1))

    # --- original grid <-> cropped grid -------------------------------------------------------

    def _overlap(self):
        """Slices of the original and of the cropped grid that hold the same voxels."""
        original, cropped = [], []
        for start, size, full in zip(self.crop_start, self.crop_shape, self.original_shape):
            low, high = max(start, 0), min(start + size, full)
            if high <= low:
                raise ValueError(f"the crop at {self.crop_start} of shape {self.crop_shape} does "
                                 f"not overlap the volume of shape {self.original_shape}")
            original.append(slice(low, high))
            cropped.append(slice(low - start, high - start))
        return tuple(original), tuple(cropped)

    def _check(self, array, shape, grid):
        if tuple(array.shape[:3]) != tuple(shape):
            raise ValueError(f"array of shape {array.shape} does not match the {grid} grid {shape}")

    def crop(self, array) -> np.ndarray:
        """``(X, Y, Z, ...)`` on the original grid -> ``crop_shape + (...)`` (zero padding)."""
        array = np.asarray(array)
        self._check(array, self.original_shape, "original")
        original, cropped = self._overlap()
        out = np.zeros(self.crop_shape + array.shape[3:], dtype=array.dtype)
        out[cropped] = array[original]
        return out

    def uncrop(self, array, fill=0) -> np.ndarray:
        """``crop_shape + (...)`` -> the original grid; voxels outside the crop get ``fill``."""
        array = np.asarray(array)
        self._check(array, self.crop_shape, "cropped")
        original, cropped = self._overlap()
        out = np.full(self.original_shape + array.shape[3:], fill, dtype=array.dtype)
        out[original] = array[cropped]
        return out

    # --- cropped grid <-> network grid --------------------------------------------------------

    def downsample(self, array, kind: str = "image") -> np.ndarray:
        """``crop_shape + (...)`` -> ``network_shape + (...)``: block mean for images (float32),
        the voxel at each block's centre for labels (so no new label ids appear)."""
        array = np.asarray(array)
        self._check(array, self.crop_shape, "cropped")
        f = self.factor
        if kind == "label":
            return np.ascontiguousarray(array[f // 2::f, f // 2::f, f // 2::f])
        if kind != "image":
            raise ValueError(f"kind must be 'image' or 'label', not {kind!r}")
        if f == 1:
            return array.astype(np.float32, copy=False)
        x, y, z = self.network_shape
        blocks = array.reshape((x, f, y, f, z, f) + array.shape[3:])
        return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)

    def to_network(self, array, kind: str = "image") -> np.ndarray:
        """Original grid ``(X, Y, Z[, c])`` -> network grid ``(x, y, z[, c])``."""
        return self.downsample(self.crop(array), kind)

    def labels_to_original(self, label_map) -> np.ndarray:
        """Network-grid ``(x, y, z)`` label map -> original grid by nearest neighbour
        (each network voxel fills its block), background outside the crop."""
        label_map = np.asarray(label_map)
        self._check(label_map, self.network_shape, "network")
        f = self.factor
        upsampled = label_map.repeat(f, axis=0).repeat(f, axis=1).repeat(f, axis=2)
        return self.uncrop(upsampled, fill=0)

    def field_to_original(self, field) -> np.ndarray:
        """Displacement field ``(x, y, z, 3)`` in network voxels -> ``(X, Y, Z, 3)`` in original
        voxels: linear up-sampling between block centres (nearest value beyond the outermost
        centres), scaled by ``factor``, zero outside the crop."""
        field = np.asarray(field, dtype=np.float32)
        if field.shape != self.network_shape + (3,):
            raise ValueError(f"field of shape {field.shape} does not match the network grid "
                             f"{self.network_shape + (3,)}")
        for axis in range(3):
            field = _upsample_linear(field, axis, self.factor)
        return self.uncrop(field * np.float32(self.factor), fill=0)

    def affine_of_network_grid(self, affine) -> np.ndarray:
        """Voxel-to-world affine of the network grid, given that of the original grid."""
        f = self.factor
        to_original = np.diag([f, f, f, 1.0])
        to_original[:3, 3] = np.asarray(self.crop_start, dtype=np.float64) + (f - 1) / 2.0
        return np.asarray(affine, dtype=np.float64) @ to_original


def _upsample_linear(array, axis: int, factor: int) -> np.ndarray:
    """Linear interpolation along ``axis`` from ``n`` block centres to ``n * factor`` voxels."""
    n = array.shape[axis]
    if factor == 1:
        return array
    if n == 1:
        return np.repeat(array, factor, axis=axis)
    position = (np.arange(n * factor) - (factor - 1) / 2.0) / factor
    position = np.clip(position, 0, n - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), n - 2)
    weight = (position - lower).astype(array.dtype)
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    return (np.take(array, lower, axis=axis) * (1 - weight)
            + np.take(array, lower + 1, axis=axis) * weight)
