"""Real ways a scan goes wrong, made on purpose: the degraded copies the QC model is calibrated
and tested on (:mod:`ltnet_keras.study.qc_calibration`). Each takes a 3D array and a numpy
``Generator`` and returns a new float32 array on the same grid; ``severity`` is 1 (mild) or 2
(strong)."""
from typing import Callable, Dict

import numpy as np


def _scale(array: np.ndarray) -> float:
    positive = array[array > 0]
    return float(np.percentile(positive, 99)) if positive.size else 1.0


def noise(array, rng, severity=1):
    """Rician noise (magnitude of complex Gaussian), sigma 4 % / 10 % of the 99th percentile."""
    sigma = (0.04, 0.10)[severity - 1] * _scale(array)
    real = array + rng.normal(0, sigma, array.shape)
    return np.hypot(real, rng.normal(0, sigma, array.shape)).astype(np.float32)


def bias_field(array, rng, severity=1):
    """A smooth multiplicative field: exp of a random quadratic over the grid, spanning about
    +-20 % / +-45 % of intensity."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in array.shape], indexing="ij")
    terms = list(axes) + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    field = sum(rng.normal() * t for t in terms)
    field = field / max(np.abs(field).max(), 1e-6) * (0.2, 0.45)[severity - 1]
    return (array * np.exp(field)).astype(np.float32)


def blur(array, rng, severity=1):
    """Gaussian blur, sigma 1.2 / 2.5 voxels."""
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(array.astype(np.float32), (1.2, 2.5)[severity - 1])


def thick_slices(array, rng, severity=1):
    """Slices 4 / 7 voxels thick along a random axis (averaged, then repeated)."""
    axis = int(rng.integers(3))
    thickness = (4, 7)[severity - 1]
    moved = np.moveaxis(array.astype(np.float32), axis, 0)
    out = np.empty_like(moved)
    for start in range(0, moved.shape[0], thickness):
        out[start:start + thickness] = moved[start:start + thickness].mean(axis=0)
    return np.moveaxis(out, 0, axis)


def partial_field_of_view(array, rng, severity=1):
    """A partial field of view: 15 % / 30 % of the object's extent along a random axis, from a
    random end, set to zero."""
    axis = int(rng.integers(3))
    inside = np.nonzero(np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).max(1) > 0)[0]
    first, last = (inside[0], inside[-1] + 1) if inside.size else (0, array.shape[axis])
    cut = int(round((0.15, 0.30)[severity - 1] * (last - first)))
    out = np.moveaxis(array.astype(np.float32).copy(), axis, 0)
    if rng.integers(2):
        out[last - cut:] = 0
    else:
        out[:first + cut] = 0
    return np.moveaxis(out, 0, axis)


def ghosting(array, rng, severity=1):
    """N/2 ghosts: a copy shifted by half the field of view along a random axis, at 15 % / 35 %
    of the intensity (every other k-space line scaled)."""
    axis = int(rng.integers(3))
    shifted = np.roll(array, array.shape[axis] // 2, axis=axis)
    return (array + (0.15, 0.35)[severity - 1] * shifted).astype(np.float32)


def motion(array, rng, severity=1):
    """Motion during the acquisition: k-space lines along a random axis taken, from a random
    point on, from the scan shifted by 2 / 5 voxels (the subject moved mid-scan)."""
    axis = int(rng.integers(3))
    shift = [0, 0, 0]
    shift[(axis + 1) % 3] = (2, 5)[severity - 1]
    moved = np.roll(array, shift, axis=(0, 1, 2))
    spectrum, spectrum_moved = np.fft.fftn(array), np.fft.fftn(moved)
    lines = np.fft.fftfreq(array.shape[axis])
    after = np.abs(lines) > (0.08, 0.03)[severity - 1]
    after &= rng.random(lines.size) < 0.5
    index = [None, None, None]
    index[axis] = slice(None)
    mask = after[tuple(index)]
    mixed = np.where(mask, spectrum_moved, spectrum)
    return np.abs(np.fft.ifftn(mixed)).astype(np.float32)


DEGRADATIONS: Dict[str, Callable] = {
    "noise": noise, "bias_field": bias_field, "blur": blur, "thick_slices": thick_slices,
    "partial_fov": partial_field_of_view, "ghosting": ghosting, "motion": motion}


def degrade(array: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """``array`` degraded by ``kind`` (:data:`DEGRADATIONS`) at ``severity`` 1 or 2, with
    ``seed``: the same call always gives the same copy."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; valid: {', '.join(DEGRADATIONS)}")
    if severity not in (1, 2):
        raise ValueError(f"severity must be 1 or 2, not {severity}")
    return DEGRADATIONS[kind](np.asarray(array, np.float32), np.random.default_rng(seed),
                              severity)
