"""Segmentation of new scans: the atlas labels warped by the forward field (Eq. 2).

The network predicts the forward field on the network grid; it is brought to the scan's own
grid (up-sampled, in original voxels) and the full-resolution atlas label map is warped there,
so the output has the scan's shape, affine and header and holds the atlas' label ids.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ltnet_keras.config import SEGMENT_INTERPOLATIONS, load_config
from ltnet_keras.data.dataset import PreparedSubject, prepare_subject
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import load_image, load_label_map, save_volume, subject_id
from ltnet_keras.data.labels import LabelTable

# Voxels per chunk of the linear label warp: bounds its (n, 8, 8) comparison to ~130 MB.
_CHUNK = 1 << 21


def _corners(positions, shape):
    """The 8 integer corners around each position and their trilinear weights."""
    low = np.floor(positions)
    frac = (positions - low).astype(np.float32)
    low = low.astype(np.int64)
    corner_index, corner_weight = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                offset = np.array([dx, dy, dz])
                idx = np.clip(low + offset, 0, np.array(shape) - 1)
                w = np.prod(np.where(offset == 1, frac, 1 - frac), axis=-1)
                corner_index.append(np.ravel_multi_index(idx.T, shape))
                corner_weight.append(w)
    return np.stack(corner_index, axis=1), np.stack(corner_weight, axis=1)


def warp_label_map(label_map, positions, method="linear") -> np.ndarray:
    """Eq. (2) for a label map: ``out[t] = label_map(positions[t])``.

    ``positions``: ``(..., 3)`` sampling coordinates in ``label_map``'s voxels, clamped to the
    volume. ``"nearest"`` takes the closest voxel; ``"linear"`` is trilinear interpolation of
    the one-hot map followed by argmax, computed exactly from the 8 corners (a label's
    interpolated value is the summed weight of the corners carrying it), without materialising
    a one-hot volume.
    """
    if method not in SEGMENT_INTERPOLATIONS:
        raise ValueError(f"unknown label interpolation {method!r}; valid: "
                         f"{', '.join(SEGMENT_INTERPOLATIONS)}")
    label_map = np.asarray(label_map)
    positions = np.asarray(positions, dtype=np.float32)
    out_shape = positions.shape[:-1]
    flat_positions = positions.reshape(-1, 3)
    flat_labels = label_map.reshape(-1)
    shape = np.array(label_map.shape)
    out = np.empty(len(flat_positions), dtype=label_map.dtype)
    for start in range(0, len(flat_positions), _CHUNK):
        chunk = flat_positions[start:start + _CHUNK]
        if method == "nearest":
            idx = np.clip(np.rint(chunk).astype(np.int64), 0, shape - 1)
            out[start:start + len(chunk)] = flat_labels[np.ravel_multi_index(idx.T, label_map.shape)]
            continue
        index, weight = _corners(chunk, label_map.shape)
        corner_labels = flat_labels[index]
        same = corner_labels[:, :, None] == corner_labels[:, None, :]
        score = np.einsum("nkj,nj->nk", same, weight, dtype=np.float32)
        best = np.argmax(score, axis=1)
        out[start:start + len(chunk)] = np.take_along_axis(corner_labels, best[:, None], 1)[:, 0]
    return out.reshape(out_shape)


def warp_image(image, positions) -> np.ndarray:
    """Trilinear ``image(positions)`` (the warped atlas, Eq. 1, on the scan's grid)."""
    from scipy.ndimage import map_coordinates
    coords = np.moveaxis(np.asarray(positions, dtype=np.float32), -1, 0)
    return map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)


@dataclass
class Segmentation:
    """One scan's result on its own grid ``(X, Y, Z)``."""
    subject: str
    labels: np.ndarray
    affine: np.ndarray
    header: object
    sampling_positions: np.ndarray
    forward_field: np.ndarray
    seconds: Dict[str, float] = field(default_factory=dict)


class Segmenter:
    """Loads a run's G_F and atlas once, then segments scans one after another."""

    def __init__(self, run_dir, atlas_image=None, atlas_labels=None,
                 label_interp: Optional[str] = None, jit_compile: bool = False):
        import tensorflow as tf

        from ltnet_keras.models.generators import make_generator
        from ltnet_keras.training import FORWARD_WEIGHTS

        run_dir = Path(run_dir)
        for needed in ("config.yaml", "atlas.json", FORWARD_WEIGHTS):
            if not (run_dir / needed).exists():
                raise VolumeError(run_dir / needed, "missing: not a finished training run")
        self.config = load_config(run_dir / "config.yaml")
        record = json.loads((run_dir / "atlas.json").read_text())
        self.label_interp = label_interp or self.config.segment.label_interp
        if self.label_interp not in SEGMENT_INTERPOLATIONS:
            raise ValueError(f"unknown label interpolation {self.label_interp!r}; valid: "
                             f"{', '.join(SEGMENT_INTERPOLATIONS)}")
        self.table = LabelTable.from_ids(record["label_ids"])
        atlas_image = atlas_image or record["image"]
        atlas_labels = atlas_labels or record["labels"]
        data = self.config.data
        self.atlas: PreparedSubject = prepare_subject(
            atlas_image, atlas_labels, data.crop_shape, data.factor, self.table,
            subject=record["atlas"])
        self.atlas_image = load_image(atlas_image).array
        self.atlas_labels = load_label_map(atlas_labels).array
        self.generator = make_generator(self.atlas.image.shape, self.config.network,
                                        "forward_generator")
        self.generator.load_weights(str(run_dir / FORWARD_WEIGHTS))
        atlas_input = tf.constant(self.atlas.image[None, ..., None])
        generator = self.generator

        # Traced once for the network grid; later scans reuse the graph.
        @tf.function(jit_compile=jit_compile, reduce_retracing=True)
        def predict_field(target):
            return generator([atlas_input, target], training=False)[0]

        self._predict_field = predict_field

    def forward_field(self, target: PreparedSubject) -> np.ndarray:
        """``(x, y, z, 3)`` forward field on the network grid for a prepared scan."""
        return self._predict_field(target.image[None, ..., None]).numpy()

    def segment(self, image_path) -> Segmentation:
        seconds = {}
        clock = time.perf_counter()
        data = self.config.data
        target = prepare_subject(image_path, None, data.crop_shape, data.factor,
                                 subject=subject_id(image_path))
        seconds["read_prepare"] = time.perf_counter() - clock

        clock = time.perf_counter()
        field_network = self.forward_field(target)
        seconds["network"] = time.perf_counter() - clock

        clock = time.perf_counter()
        forward_field = target.grid.field_to_original(field_network)
        # Both crops are centred on their own brain: network voxel p is original voxel
        # start + factor * p (+ block centre) in each, hence the constant offset between them.
        offset = (np.array(self.atlas.grid.crop_start) - np.array(target.grid.crop_start))
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)
                                      for n in target.grid.original_shape], indexing="ij"), -1)
        positions = grid + forward_field + offset.astype(np.float32)
        labels = warp_label_map(self.atlas_labels, positions, self.label_interp)
        seconds["warp"] = time.perf_counter() - clock
        return Segmentation(target.subject, labels, target.affine, target.header, positions,
                            forward_field, seconds)

    def segment_to_files(self, image_path, out_dir, save_warped_atlas=False,
                         save_field=False) -> Segmentation:
        """Segment one scan; write ``out_dir/<id>.nii.gz`` (label ids, the scan's grid and
        header) and, if asked, ``out_dir/warped_atlas/<id>.nii.gz`` and
        ``out_dir/forward_field/<id>.nii.gz`` (3 components, in voxels of the scan)."""
        result = self.segment(image_path)
        out_dir = Path(out_dir)
        clock = time.perf_counter()
        save_volume(result.labels, out_dir / f"{result.subject}.nii.gz", result.affine,
                    result.header)
        if save_warped_atlas:
            save_volume(warp_image(self.atlas_image, result.sampling_positions),
                        out_dir / "warped_atlas" / f"{result.subject}.nii.gz", result.affine)
        if save_field:
            save_volume(result.forward_field, out_dir / "forward_field" / f"{result.subject}.nii.gz",
                        result.affine)
        result.seconds["write"] = time.perf_counter() - clock
        return result
