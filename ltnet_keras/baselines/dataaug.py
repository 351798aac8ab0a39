"""DataAug: one-shot segmentation by learned data augmentation (Zhao et al., CVPR 2019).

Zhao et al. learn two transforms from the one labelled atlas ``a`` to each unlabelled scan
``y_j``: a spatial one (a VoxelMorph field ``phi_j``) and an appearance one (an additive
intensity change ``psi_j`` in atlas space), then synthesise labelled volumes by combining the
spatial transform of one scan with the appearance transform of another:

    synthetic image  = (a + psi_j) o phi_i          synthetic labels = s_a o phi_i

and train a supervised segmenter on them. Here:

* **Spatial model**: a finished VoxelMorph run of this package (``dataaug.spatial_run``: its
  ``forward_generator.h5``, atlas and grid); ``phi_i`` is its forward field for pool scan ``i``
  on the network grid (the atlas warped onto scan ``i``: Eq. 1 of the LT-Net paper).
* **Appearance model** (:func:`build_appearance_model`): a voxelmorph U-Net taking
  ``(atlas, scan_j)`` and returning ``psi_j`` in atlas space, trained with
  ``|| (a + psi_j) o phi_j - y_j ||^2 + lambda_a * L_smooth(c_a, psi_j)`` where ``L_smooth`` is
  the squared spatial gradient of ``psi_j`` except across the boundaries ``c_a`` of the atlas
  labels (Zhao et al., Sec. 3.2; ``lambda_a = 0.02``). Its last convolution starts at zero, so
  training starts from "no appearance change".
* **Sampling** (:class:`SyntheticVolumes`): generated on the fly, every training step draws a
  fresh pair ``(i, j)`` of pool scans (a pure function of the seed and the step); with
  probability ``dataaug.atlas_fraction`` the step shows the atlas itself instead. The labels
  are warped by nearest neighbour (Zhao et al.'s released code) or, with
  ``dataaug.label_interp: linear``, as a trilinearly warped one-hot map (soft targets).
* **Segmenter**: the segmentation U-Net of :mod:`ltnet_keras.baselines.segnet` (the same network and
  loss as the supervised upper bound of Table 5).

Only the atlas' label map is ever read while training (the pool is read as images only); the
validation subjects' labels are read afterwards, to score.

Where this departs from the paper:

* Zhao et al. train a second, inverse spatial model to bring each scan into atlas space and
  compute the appearance loss there; we have no inverse model and compute it in the scan's
  space, through the forward warp of ``a + psi_j``. The appearance model sees the scan in its
  own space (not warped to the atlas), which the affine pre-alignment of LPBA40 keeps close.
* The spatial model is this package's VoxelMorph run at its network grid and step budget, not
  one pre-trained on a large pool; volumes are down-sampled like every other row of Table 5.
* The segmenter is a 3D U-Net trained with soft Dice + cross-entropy (theirs segments 2D
  slices with cross-entropy); it is the same network as our U-Net upper bound so the two rows
  differ only in their training data.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ltnet_keras.data.dataset import PreparedSubject, prepare_subjects
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.records import atomic_write_text
from ltnet_keras.baselines.unet import build_unet, draw_rng, file_digest, train_loop
from ltnet_keras.baselines.segnet_config import (SYNTHETIC_LABEL_INTERPOLATIONS, AppearanceConfig,
                                       SegNetConfig)

APPEARANCE_DIR = "appearance"
APPEARANCE_WEIGHTS = "appearance_model.h5"
RECORD = "dataaug.json"
# Keeps the appearance model's draws apart from the segmenter's in one run.
APPEARANCE_STREAM = 1


# ----------------------------------------------------------------------------- appearance model

def build_appearance_model(inshape, config: Optional[AppearanceConfig] = None,
                           name: str = "appearance"):
    """``[atlas, scan]`` (each ``(batch, x, y, z, 1)``) -> intensity change ``psi``
    ``(batch, x, y, z, 1)`` in atlas space; the output convolution starts at zero."""
    import tensorflow as tf
    config = config or AppearanceConfig()
    shape = tuple(int(s) for s in inshape) + (1,)
    atlas = tf.keras.Input(shape, name=f"{name}_atlas")
    scan = tf.keras.Input(shape, name=f"{name}_scan")
    unet = build_unet(inshape, 2, config.enc_features, config.dec_features, name)
    features = unet(tf.keras.layers.Concatenate(name=f"{name}_pair")([atlas, scan]))
    delta = tf.keras.layers.Conv3D(1, 3, padding="same", kernel_initializer="zeros",
                                   bias_initializer="zeros", name=f"{name}_delta")(features)
    return tf.keras.Model([atlas, scan], delta, name=name)


def label_boundaries(label_map) -> np.ndarray:
    """``c_a``: True at every voxel with a face neighbour of another label, ``(x, y, z)``."""
    label_map = np.asarray(label_map)
    boundary = np.zeros(label_map.shape, dtype=bool)
    for axis in range(label_map.ndim):
        lower = [slice(None)] * label_map.ndim
        upper = [slice(None)] * label_map.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        differs = label_map[tuple(lower)] != label_map[tuple(upper)]
        boundary[tuple(lower)] |= differs
        boundary[tuple(upper)] |= differs
    return boundary


def boundary_masked_smoothness(delta, boundary):
    """``L_smooth(c_a, psi)``: the mean squared forward difference of ``psi`` along each axis,
    averaged over the 3 axes, where neither voxel of a difference is on a label boundary.

    ``delta``: ``(batch, x, y, z, 1)``; ``boundary``: ``(x, y, z)`` or ``(batch, x, y, z)``
    (1 on boundaries). Differences touching a boundary count as 0 (the mean still runs over
    every difference), so ``psi`` may change sharply between structures. Returns ``(batch,)``.
    """
    import tensorflow as tf
    delta = tf.cast(delta, tf.float32)[..., 0]
    keep = 1.0 - tf.cast(boundary, tf.float32)
    if keep.shape.rank == 3:
        keep = keep[None]
    terms = []
    for axis in (1, 2, 3):
        n = tf.shape(delta)[axis]
        difference = (tf.gather(delta, tf.range(1, n), axis=axis)
                      - tf.gather(delta, tf.range(0, n - 1), axis=axis))
        weight = (tf.gather(keep, tf.range(1, n), axis=axis)
                  * tf.gather(keep, tf.range(0, n - 1), axis=axis))
        terms.append(tf.reduce_mean(weight * difference * difference, [1, 2, 3]))
    return tf.add_n(terms) / 3.0


def synthesise_image(atlas, delta, field):
    """``(atlas + delta) o field`` (voxelmorph's linear warp, borders clamped), all
    ``(batch, x, y, z, ·)``; ``field`` in voxels of the network grid."""
    from ltnet_keras.models import trilinear
    return trilinear.warp(atlas + delta, field)


def appearance_loss_terms(atlas, delta, field, scan, boundary, smooth: float):
    """``{"total", "reconstruction", "smoothness"}``, each ``(batch,)``: the mean squared
    difference between the synthetic image and the scan, in the scan's space, plus
    ``smooth`` (lambda_a) times :func:`boundary_masked_smoothness`."""
    import tensorflow as tf
    difference = synthesise_image(atlas, delta, field) - tf.cast(scan, tf.float32)
    reconstruction = tf.reduce_mean(difference * difference, [1, 2, 3, 4])
    smoothness = boundary_masked_smoothness(delta, boundary)
    return {"total": reconstruction + smooth * smoothness, "reconstruction": reconstruction,
            "smoothness": smoothness}


def train_appearance_model(atlas_image, atlas_label_channels, scans, fields,
                           config: AppearanceConfig, run_dir, seed: int = 0, verbose: int = 1):
    """Train (or resume) the appearance model in ``run_dir`` on the pool ``scans``
    ``(M, x, y, z)`` with their forward fields ``(M, x, y, z, 3)``; one scan per step."""
    import tensorflow as tf
    atlas_image = np.asarray(atlas_image, np.float32)
    scans = np.asarray(scans, np.float32)
    fields = np.asarray(fields, np.float32)
    if scans.shape[0] != fields.shape[0] or scans.shape[1:] != atlas_image.shape \
            or fields.shape[1:] != atlas_image.shape + (3,):
        raise ValueError(f"appearance training needs scans (M, x, y, z) and fields "
                         f"(M, x, y, z, 3) on the atlas grid {atlas_image.shape}; got "
                         f"{scans.shape} and {fields.shape}")
    tf.keras.utils.set_random_seed(seed)
    model = build_appearance_model(atlas_image.shape, config)
    optimizer = tf.keras.optimizers.Adam(config.learning_rate)
    atlas_batch = atlas_image[None, ..., None]
    boundary = label_boundaries(atlas_label_channels).astype(np.float32)

    def next_batch(step):
        j = int(draw_rng(seed, step, APPEARANCE_STREAM).integers(len(scans)))
        return atlas_batch, scans[j][None, ..., None], fields[j][None]

    def loss_fn(net, atlas, scan, field):
        delta = net([atlas, scan], training=True)
        return appearance_loss_terms(atlas, delta, field, scan, boundary, config.smooth)

    train_loop(model, optimizer, loss_fn, next_batch, run_dir, config.steps, config.log_every,
               config.checkpoint_every, APPEARANCE_WEIGHTS, verbose,
               label=f"{Path(run_dir).parent.name} appearance")
    return model


def appearance_deltas(model, atlas_image, scans) -> np.ndarray:
    """``psi_j`` of every scan: ``(M, x, y, z)`` in atlas space."""
    atlas = np.asarray(atlas_image, np.float32)[None, ..., None]
    return np.stack([model([atlas, np.asarray(s, np.float32)[None, ..., None]],
                           training=False).numpy()[0, ..., 0] for s in scans])


# ----------------------------------------------------------------------------- sampling

@dataclass
class SyntheticVolumes:
    """DataAug's training data: the atlas under the spatial transform of one pool scan and
    the appearance transform of another, drawn afresh at every step.

    ``atlas_image`` ``(x, y, z)``; ``atlas_label_channels`` ``(x, y, z)`` label-table channel
    of each atlas voxel; ``fields`` ``(N, x, y, z, 3)`` forward fields of the pool (atlas ->
    scan ``i``); ``deltas`` ``(M, x, y, z)`` appearance changes (atlas space).
    """
    atlas_image: np.ndarray
    atlas_label_channels: np.ndarray
    n_channels: int
    fields: np.ndarray
    deltas: np.ndarray
    atlas_subject: str = "atlas"
    label_interp: str = "nearest"
    atlas_fraction: float = 0.0

    def __post_init__(self):
        if self.label_interp not in SYNTHETIC_LABEL_INTERPOLATIONS:
            raise ValueError(f"unknown label interpolation {self.label_interp!r}; valid: "
                             f"{', '.join(SYNTHETIC_LABEL_INTERPOLATIONS)}")
        shape = tuple(self.atlas_image.shape)
        if tuple(self.atlas_label_channels.shape) != shape or \
                tuple(self.fields.shape[1:]) != shape + (3,) or \
                tuple(self.deltas.shape[1:]) != shape:
            raise ValueError(f"atlas {shape}, labels {self.atlas_label_channels.shape}, fields "
                             f"{self.fields.shape} and deltas {self.deltas.shape} must share "
                             "one grid")
        if len(self.fields) == 0 or len(self.deltas) == 0:
            raise ValueError("DataAug needs at least one spatial and one appearance transform")
        self._pair = None

    @property
    def labelled_subjects(self) -> List[str]:
        return [self.atlas_subject]

    def describe(self) -> dict:
        return {"kind": "DataAug synthetic volumes, generated on the fly",
                "atlas": self.atlas_subject, "spatial_transforms": int(len(self.fields)),
                "appearance_transforms": int(len(self.deltas)),
                "label_interp": self.label_interp, "atlas_fraction": self.atlas_fraction}

    def _compiled_pair(self):
        import tensorflow as tf

        from ltnet_keras.models import trilinear
        from ltnet_keras.inference.segment import sampling_grid, warp_labels_tf
        atlas = tf.constant(self.atlas_image[None, ..., None], tf.float32)
        channels = tf.constant(self.atlas_label_channels.astype(np.int32))
        fields = tf.constant(self.fields, tf.float32)
        deltas = tf.constant(self.deltas[..., None], tf.float32)
        n_channels, nearest = int(self.n_channels), self.label_interp == "nearest"
        identity = sampling_grid(self.atlas_image.shape)

        @tf.function
        def pair(i, j):
            field = fields[i][None]
            image = synthesise_image(atlas, deltas[j][None], field)[0, ..., 0]
            if nearest:
                warped = warp_labels_tf(channels, identity + field[0], "nearest")
                labels = tf.one_hot(warped, n_channels, dtype=tf.float32)
            else:
                labels = trilinear.warp_one_hot(channels[None], field, n_channels)[0]
            return image, labels
        return pair

    def pair(self, i: int, j: int):
        """Synthetic ``(image (x, y, z), one-hot labels (x, y, z, C))``: the atlas with the
        appearance change of scan ``j``, warped by the field of scan ``i``."""
        if self._pair is None:
            self._pair = self._compiled_pair()
        image, labels = self._pair(np.int32(i), np.int32(j))
        return image.numpy(), labels.numpy()

    def draws(self, seed: int, step: int, batch_size: int = 1) -> List[Optional[tuple]]:
        """``(i, j)`` of each example of ``step`` (``None``: the atlas itself)."""
        rng = draw_rng(seed, step)
        out = []
        for _ in range(batch_size):
            show_atlas = rng.random() < self.atlas_fraction
            i, j = int(rng.integers(len(self.fields))), int(rng.integers(len(self.deltas)))
            out.append(None if show_atlas else (i, j))
        return out

    def batch(self, seed: int, step: int, batch_size: int = 1):
        """``(images (b, x, y, z, 1), one-hot targets (b, x, y, z, C))`` for ``step``."""
        images, targets = [], []
        eye = np.eye(self.n_channels, dtype=np.float32)
        for draw in self.draws(seed, step, batch_size):
            if draw is None:
                image, labels = self.atlas_image, eye[self.atlas_label_channels]
            else:
                image, labels = self.pair(*draw)
            images.append(image)
            targets.append(labels)
        return (np.stack(images)[..., None].astype(np.float32),
                np.stack(targets).astype(np.float32))


# ----------------------------------------------------------------------------- from a run

def _spatial_segmenter(config: SegNetConfig):
    """The VoxelMorph run of ``dataaug.spatial_run``, checked against ``config``."""
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.training import FORWARD_WEIGHTS
    run = Path(config.dataaug.spatial_run or ".")
    if not config.dataaug.spatial_run or not (run / FORWARD_WEIGHTS).exists():
        raise FileNotFoundError(f"dataaug.spatial_run {config.dataaug.spatial_run!r}: not a "
                                f"finished VoxelMorph run (no {FORWARD_WEIGHTS})")
    segmenter = Segmenter(run, align="none")
    spatial = segmenter.config.data
    mismatches = []
    if tuple(spatial.crop_shape) != tuple(config.data.crop_shape) or \
            spatial.factor != config.data.factor:
        mismatches.append(f"grid: crop {list(spatial.crop_shape)} / factor {spatial.factor} "
                          f"there, crop {list(config.data.crop_shape)} / factor "
                          f"{config.data.factor} here")
    if spatial.align != "none":
        mismatches.append(f"data.align {spatial.align!r} there (DataAug needs 'none')")
    atlas = segmenter.atlas.subject
    if config.data.atlas not in ("auto", atlas):
        mismatches.append(f"atlas {atlas} there, {config.data.atlas} here")
    if mismatches:
        raise ValueError(f"dataaug.spatial_run {run} does not fit this run: "
                         + "; ".join(mismatches))
    return segmenter


def pool_subjects(config: SegNetConfig, atlas: str) -> List[str]:
    pool = [s for s in config.data.train_subjects if s != atlas]
    if not pool:
        raise ValueError("DataAug's pool of unlabelled scans is empty once the atlas is taken "
                         "out of data.train_subjects")
    return pool


def forward_fields(segmenter, pool: Sequence[PreparedSubject]) -> np.ndarray:
    """``(N, x, y, z, 3)``: the spatial model's forward field (atlas -> scan) of each scan."""
    return np.stack([np.asarray(segmenter.forward_field(scan), np.float32) for scan in pool])


def prepare_synthetic_source(config: SegNetConfig, run_dir, table: LabelTable,
                             verbose: int = 1) -> SyntheticVolumes:
    """Spatial fields of the pool, the trained (or resumed) appearance model in
    ``run_dir/appearance/`` and its deltas: everything :class:`SyntheticVolumes` needs.
    Reads the atlas' labels and the pool's images, nothing else; writes ``dataaug.json``."""
    from ltnet_keras.training import FORWARD_WEIGHTS
    run_dir = Path(run_dir)
    spatial_weights = Path(config.dataaug.spatial_run) / FORWARD_WEIGHTS
    segmenter = _spatial_segmenter(config)
    digest = file_digest(spatial_weights)
    if (run_dir / RECORD).exists():
        # The appearance model and the segmenter resume from checkpoints made with the fields
        # of the weights recorded there; other weights would mix two spatial models.
        recorded = json.loads((run_dir / RECORD).read_text()).get("spatial_weights_sha256")
        if recorded != digest:
            raise ValueError(f"{run_dir}: {spatial_weights} changed since this DataAug run "
                             "started; use another folder for DataAug on the new weights")
    atlas = segmenter.atlas
    if list(segmenter.table.ids) != list(table.ids):
        raise ValueError(f"dataaug.spatial_run {config.dataaug.spatial_run}: its label ids "
                         f"differ from {config.data.resolved_labels_tsv()}")
    atlas_channels = table.to_channels(atlas.labels, source=atlas.label_path)
    pool_ids = pool_subjects(config, atlas.subject)
    # Images only: the pool's labels are never opened (the one-shot setting).
    pool = prepare_subjects(config.data, pool_ids, with_labels=False)
    fields = forward_fields(segmenter, pool)
    scans = np.stack([scan.image for scan in pool])
    appearance = config.dataaug.appearance
    model = train_appearance_model(atlas.image, atlas_channels, scans, fields, appearance,
                                   run_dir / APPEARANCE_DIR, config.train.seed, verbose)
    deltas = appearance_deltas(model, atlas.image, scans)
    source = SyntheticVolumes(atlas.image.astype(np.float32), atlas_channels, table.n_channels,
                              fields, deltas, atlas.subject, config.dataaug.label_interp,
                              config.dataaug.atlas_fraction)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECORD, json.dumps({
        "spatial_run": str(config.dataaug.spatial_run),
        "spatial_weights_sha256": digest,
        "atlas": atlas.subject, "atlas_labels": atlas.label_path,
        "labelled_subjects": source.labelled_subjects, "pool": pool_ids,
        "appearance_steps": appearance.steps,
        "delta_abs_mean": float(np.abs(deltas).mean()),
        "sampling": source.describe()}, indent=2))
    return source
