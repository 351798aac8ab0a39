"""Segmentation of new scans: the atlas labels warped by the forward field (Eq. 2).

The network predicts the forward field on the network grid; it is brought to the scan's own
grid (up-sampled, in original voxels) and the full-resolution atlas label map is warped there,
so the output has the scan's shape, affine and header and holds the atlas' label ids.
"""
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras.config import SEGMENT_INTERPOLATIONS, load_config
from ltnet_keras.data.dataset import PreparedSubject, prepare_volumes
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import Volume, load_image, load_subject, save_volume, subject_id
from ltnet_keras.data.labels import LabelTable

# Sub-folders of the output folder for the optional outputs of segment_to_files.
WARPED_ATLAS_DIR = "warped_atlas"
FORWARD_FIELD_DIR = "forward_field"
# A scan is refused when, along any world axis, it covers less than this fraction of the
# atlas' field of view: the network was trained on whole heads cropped to the atlas' extent,
# and a slab or a thumbnail cannot be registered to it (it would still get a label map, made
# of atlas labels warped into padding). Whole-head scans of any usual resolution pass.
MIN_FIELD_OF_VIEW_FRACTION = 0.5


def _check_method(method):
    if method not in SEGMENT_INTERPOLATIONS:
        raise ValueError(f"unknown label interpolation {method!r}; valid: "
                         f"{', '.join(SEGMENT_INTERPOLATIONS)}")


def _axis_interpolation(n_out, crop_start, n_network, factor):
    """Where each original voxel along one axis falls between network block centres."""
    import tensorflow as tf
    cropped = tf.range(n_out, dtype=tf.float32) - tf.cast(crop_start, tf.float32)
    f = tf.cast(factor, tf.float32)
    # Network voxel i covers cropped voxels [i f, (i + 1) f): its centre is i f + (f - 1) / 2.
    q = tf.clip_by_value((cropped - (f - 1.0) / 2.0) / f, 0.0, tf.cast(n_network - 1, tf.float32))
    lower = tf.minimum(tf.cast(tf.floor(q), tf.int32), tf.maximum(n_network - 2, 0))
    upper = tf.minimum(lower + 1, n_network - 1)
    weight = q - tf.cast(lower, tf.float32)
    inside = tf.logical_and(cropped >= 0.0, cropped < f * tf.cast(n_network, tf.float32))
    return lower, upper, weight, inside


def field_to_grid(field, original_shape, crop_start, factor):
    """Network-grid field ``(x, y, z, 3)`` -> ``(X, Y, Z, 3)`` in original voxels (TF).

    The same mapping as :meth:`GridSpec.field_to_original`: linear between block centres,
    scaled by ``factor``, zero outside the crop; written as three separable 1D interpolations
    so it runs in the same graph as the label warp.
    """
    import tensorflow as tf
    out = field
    inside_masks = []
    for axis in range(3):
        lower, upper, weight, inside = _axis_interpolation(
            original_shape[axis], crop_start[axis], tf.shape(field)[axis], factor)
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        weight = tf.reshape(weight, shape)
        out = (tf.gather(out, lower, axis=axis) * (1.0 - weight)
               + tf.gather(out, upper, axis=axis) * weight)
        inside_masks.append(tf.reshape(tf.cast(inside, tf.float32), shape))
    mask = inside_masks[0] * inside_masks[1] * inside_masks[2]
    return out * tf.cast(factor, tf.float32) * mask


def sampling_grid(shape):
    """``(X, Y, Z, 3)`` voxel coordinates of a grid (the identity transform)."""
    import tensorflow as tf
    axes = [tf.range(shape[i], dtype=tf.float32) for i in range(3)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def warp_labels_tf(label_map, positions, method="linear"):
    """Eq. (2) for a label map in TF: ``out[t] = label_map(positions[t])``, clamped at borders.

    ``"nearest"`` takes the closest voxel. ``"linear"`` is trilinear interpolation of the
    one-hot map followed by argmax, computed exactly from the 8 surrounding voxels (a label's
    interpolated value is the summed weight of the corners carrying it) without materialising
    a one-hot volume of every label.
    """
    import tensorflow as tf
    _check_method(method)
    upper_bound = tf.cast(tf.shape(label_map) - 1, tf.float32)
    positions = tf.clip_by_value(positions, 0.0, upper_bound)
    if method == "nearest":
        return tf.gather_nd(label_map, tf.cast(tf.round(positions), tf.int32))
    lower = tf.floor(positions)
    frac = positions - lower
    lower = tf.cast(lower, tf.int32)
    top = tf.shape(label_map) - 1
    corner_labels, corner_weights = [], []
    for corner in range(8):
        offset = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
        index = tf.minimum(lower + tf.constant(offset, tf.int32), top)
        corner_labels.append(tf.gather_nd(label_map, index))
        weight = 1.0
        for axis in range(3):
            weight *= frac[..., axis] if offset[axis] else 1.0 - frac[..., axis]
        corner_weights.append(weight)
    best_label, best_score = corner_labels[0], tf.fill(tf.shape(corner_weights[0]), -1.0)
    for k in range(8):
        score = tf.add_n([tf.where(tf.equal(corner_labels[j], corner_labels[k]),
                                   corner_weights[j], 0.0) for j in range(8)])
        better = score > best_score
        best_label = tf.where(better, corner_labels[k], best_label)
        best_score = tf.where(better, score, best_score)
    return best_label


def warp_label_map(label_map, positions, method="linear") -> np.ndarray:
    """numpy front end of :func:`warp_labels_tf`: ``positions`` ``(..., 3)`` in voxels of
    ``label_map``; returns a label map of shape ``positions.shape[:-1]`` with its dtype."""
    import tensorflow as tf
    _check_method(method)
    label_map = np.asarray(label_map)
    warped = warp_labels_tf(tf.constant(label_map.astype(np.int32)),
                            tf.constant(np.asarray(positions, dtype=np.float32)), method)
    return warped.numpy().astype(label_map.dtype)


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
    forward_field: np.ndarray
    atlas_offset: np.ndarray
    seconds: Dict[str, float] = field(default_factory=dict)
    #: The field as G_F predicted it, ``(x, y, z, 3)`` in voxels of the network grid.
    network_field: Optional[np.ndarray] = None

    @property
    def sampling_positions(self) -> np.ndarray:
        """``(X, Y, Z, 3)``: where each voxel of the scan samples the atlas (atlas voxels)."""
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)
                                      for n in self.labels.shape], indexing="ij"), -1)
        return grid + self.forward_field + self.atlas_offset


def output_suffix(image_path) -> str:
    """File type of the label map written for a scan (NIfTI, whatever the scan's type)."""
    return ".nii.gz"


def _distinct_names(images: Sequence[Path]) -> List[str]:
    """Output names (without suffix) for ``images``: the subject id, prefixed with as many
    parent folder names as it takes to tell apart scans whose ids repeat
    (``a/brainmask.mgz``, ``b/brainmask.mgz`` -> ``a_brainmask``, ``b_brainmask``)."""
    folders = [path.relative_to(path.anchor).parent.parts for path in images]
    names = [subject_id(path) for path in images]
    for depth in range(1, max(len(f) for f in folders) + 1):
        repeated = {name for name, count in Counter(names).items() if count > 1}
        if not repeated:
            break
        names = [("_".join(f[-depth:] + (subject_id(path),)) if name in repeated else name)
                 for name, f, path in zip(names, folders, images)]
    return names


def plan_output_paths(images, out_dir, overwrite=False, side_folders=()) -> List[Path]:
    """Where ``ltnet segment`` writes the label map of each scan: ``out_dir/<name><suffix>``.

    Refuses (VolumeError), before anything is written: a scan given twice, two scans that
    would get the same output, an output that would replace one of the scans, and unless
    ``overwrite`` an output that exists already, including those in ``side_folders`` (the
    sub-folders of ``out_dir`` that get a file of the same name, e.g. ``warped_atlas``).
    """
    # Absolute, not resolved: a symlinked scan keeps its own folder names.
    images = [Path(os.path.abspath(path)) for path in images]
    given_twice = [path for path, count in Counter(images).items() if count > 1]
    if given_twice:
        raise VolumeError(given_twice[0], "this scan is given more than once")
    out_dir = Path(out_dir)
    outputs = [out_dir / f"{name}{output_suffix(image)}"
               for name, image in zip(_distinct_names(images), images)]
    for output, count in Counter(outputs).items():
        if count > 1:
            clash = [str(image) for image, o in zip(images, outputs) if o == output]
            raise VolumeError(output, f"scans {clash} would all be written here; rename them")
    written = outputs + [o.parent / folder / o.name for folder in side_folders for o in outputs]
    replaced = [path for path in written if Path(os.path.abspath(path)) in set(images)]
    if replaced:
        raise VolumeError(replaced[0], "the output would replace this input scan; choose "
                                       "another output folder")
    existing = [str(path) for path in written if path.exists()]
    if existing and not overwrite:
        raise VolumeError(existing[0], f"output exists already ({len(existing)} of the outputs "
                                       "do); pass --overwrite to replace them")
    return outputs


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


def _recorded_atlas(record: dict, data) -> tuple:
    """The run's atlas files: as recorded, else the same subject under the data root
    (``$LTNET_DATA``), so a run directory keeps working when moved to another machine."""
    if Path(record["image"]).exists() and Path(record["labels"]).exists():
        return record["image"], record["labels"]
    from ltnet_keras.data.io import find_subjects
    root = data.resolved_root()
    found = find_subjects(root).get(record["atlas"]) if root.is_dir() else None
    if found is None or found.label is None:
        raise VolumeError(record["image"], f"atlas {record['atlas']} not found here nor under "
                          f"{root}; pass --atlas-image and --atlas-labels")
    return str(found.image), str(found.label)


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
        _check_method(self.label_interp)
        self.table = LabelTable.from_ids(record["label_ids"])
        data = self.config.data
        if not (atlas_image and atlas_labels):
            recorded_image, recorded_labels = _recorded_atlas(record, data)
            atlas_image = atlas_image or recorded_image
            atlas_labels = atlas_labels or recorded_labels
        atlas_volume, atlas_label_volume = load_subject(atlas_image, atlas_labels, self.table)
        self.atlas_volume = atlas_volume
        self.atlas: PreparedSubject = prepare_volumes(
            atlas_volume, atlas_label_volume, data.crop_shape, data.factor, record["atlas"])
        self.atlas_image = atlas_volume.array
        self.atlas_labels = atlas_label_volume.array
        self.generator = make_generator(self.atlas.image.shape, self.config.network,
                                        "forward_generator")
        self.generator.load_weights(str(run_dir / FORWARD_WEIGHTS))
        atlas_input = tf.constant(self.atlas.image[None, ..., None])
        atlas_labels_tensor = tf.constant(self.atlas_labels.astype(np.int32))
        generator, method = self.generator, self.label_interp
        factor = data.factor

        # Each graph is traced once per grid shape; later scans reuse it.
        @tf.function(jit_compile=jit_compile, reduce_retracing=True)
        def predict_field(target):
            return generator([atlas_input, target], training=False)[0]

        # XLA fuses the up-sampling and the 8-corner label vote into a few loops over the grid.
        @tf.function(jit_compile=True)
        def transfer(field_network, original_shape, crop_start, offset):
            forward_field = field_to_grid(field_network, original_shape, crop_start, factor)
            positions = sampling_grid(original_shape) + forward_field + offset
            return warp_labels_tf(atlas_labels_tensor, positions, method), forward_field

        self._predict_field = predict_field
        self._transfer = transfer

    def forward_field(self, target: PreparedSubject):
        """``(x, y, z, 3)`` forward field (a tensor) on the network grid for a prepared scan."""
        return self._predict_field(target.image[None, ..., None])

    def prepare(self, image_path) -> PreparedSubject:
        """Read a scan, check that this run can segment it and put it on the network grid.

        Refuses (VolumeError naming the file) what ``data.io`` refuses, a constant image, and
        a scan too small for the atlas' field of view (:func:`check_field_of_view`).
        """
        image = load_image(image_path)
        check_field_of_view(image, self.atlas_volume)
        data = self.config.data
        return prepare_volumes(image, None, data.crop_shape, data.factor, subject_id(image_path))

    def segment(self, image_path) -> Segmentation:
        """Label map of one scan on its own grid, with the field in its voxels (Eq. 2)."""
        seconds = {}
        clock = time.perf_counter()
        target = self.prepare(image_path)
        seconds["read_prepare"] = time.perf_counter() - clock

        clock = time.perf_counter()
        field_network = self.forward_field(target)
        # Both crops are centred on their own brain: network voxel p is original voxel
        # start + factor * p (+ block centre) in each, hence a constant offset between them.
        offset = (np.array(self.atlas.grid.crop_start)
                  - np.array(target.grid.crop_start)).astype(np.float32)
        labels, forward_field = self._transfer(
            field_network, tuple(target.grid.original_shape),
            np.array(target.grid.crop_start, dtype=np.int32), offset)
        labels, forward_field = labels.numpy(), forward_field.numpy()
        seconds["network_and_warp"] = time.perf_counter() - clock
        return Segmentation(target.subject, labels.astype(self.atlas_labels.dtype),
                            target.affine, target.header, forward_field, offset, seconds,
                            network_field=np.asarray(field_network))

    def segment_to_files(self, image_path, out_dir, save_warped_atlas=False,
                         save_field=False, name: Optional[str] = None) -> Segmentation:
        """Segment one scan; write ``out_dir/<name>`` (label ids, the scan's grid and header;
        ``name`` defaults to the subject id and :func:`output_suffix`) and, if asked,
        ``out_dir/warped_atlas/<name>`` and ``out_dir/forward_field/<name>`` (3 components,
        in voxels of the scan). Existing files are replaced: see :func:`plan_output_paths`."""
        result = self.segment(image_path)
        out_dir = Path(out_dir)
        name = name or f"{result.subject}{output_suffix(image_path)}"
        clock = time.perf_counter()
        save_volume(result.labels, out_dir / name, result.affine, result.header)
        if save_warped_atlas:
            save_volume(warp_image(self.atlas_image, result.sampling_positions),
                        out_dir / WARPED_ATLAS_DIR / name, result.affine)
        if save_field:
            save_volume(result.forward_field, out_dir / FORWARD_FIELD_DIR / name, result.affine)
        result.seconds["write"] = time.perf_counter() - clock
        return result
