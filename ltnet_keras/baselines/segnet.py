"""Segmentation U-Net: the network of Table 5's supervised upper bound and of DataAug.

The network is voxelmorph 0.2's U-Net (the same encoder/decoder as G_F and G_B) on one image
channel, with a 1x1x1 convolution and a softmax over the label table's channels (background and
every label id; Ronneberger et al., MICCAI 2015). It runs on the registration runs' network grid
(the scan cropped around its brain and down-sampled by ``data.factor``:
:mod:`ltnet_keras.data.preprocess`) and is trained with soft Dice + cross-entropy and Adam.

At test time its probabilities are interpolated linearly from the network grid's block centres
to every voxel of the scan's own grid and the most probable label is taken there, as
:mod:`ltnet_keras.inference.segment` interpolates the warped atlas' one-hot labels and takes the arg-max
(its ``linear`` label transfer), so both kinds of method are scored on the same full-resolution
grid by :mod:`ltnet_keras.evaluation`.

A run directory holds ``config.yaml`` (a :class:`~ltnet_keras.baselines.segnet_config.SegNetConfig`),
``environment.json``, ``segnet.json`` (label ids, grid, which subjects' labels were used),
``checkpoints/``, ``history.csv``, ``loss_curve.png``, at the end ``segnet.h5``, and once scored
``segmentations/``, ``scores_segnet.csv``, ``summary.csv`` and ``results.md``.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.config import check_resume_config
from ltnet_keras.data.dataset import PreparedSubject, prepare_subjects, prepare_volumes, \
    subject_files
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import load_image, load_label_map, output_suffix, save_volume, \
    subject_id
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.data.preprocess import GridSpec
from ltnet_keras.records import atomic_write_text
from ltnet_keras.baselines import dataaug
from ltnet_keras.baselines.segnet_config import (SegNetConfig, SegNetNetworkConfig,
                                                 load_segnet_config, save_segnet_config,
                                                 segnet_config_to_dict)
from ltnet_keras.baselines.unet import (build_unet, draw_rng, environment_record,  # noqa: F401
                                        file_digest, segmentation_loss_terms, train_loop)

SEGNET_WEIGHTS = "segnet.h5"
RUN_RECORD = "segnet.json"
SCORES = "scores_segnet.csv"
SEGMENTATIONS_DIR = "segmentations"
# Original-grid planes (along x) interpolated at a time when probabilities go back to a scan's
# grid: (slab, y, z, channels) float32 arrays, ~50 MB at the peak for 57 channels and a
# 128x192x128 crop (measured with tracemalloc; 8 planes take ~160 MB and no less time).
PREDICTION_SLAB = 2


def build_segnet(inshape, n_channels: int, network: Optional[SegNetNetworkConfig] = None,
                 name: str = "segnet"):
    """The segmentation U-Net: ``(batch, x, y, z, 1)`` image -> ``(batch, x, y, z, n_channels)``
    label probabilities (softmax; channel ``k`` is the label table's channel ``k``)."""
    import tensorflow as tf
    network = network or SegNetNetworkConfig()
    unet = build_unet(inshape, 1, network.enc_features, network.dec_features, name)
    logits = tf.keras.layers.Conv3D(int(n_channels), 1, name=f"{name}_logits")(unet.output)
    probabilities = tf.keras.layers.Softmax(name=f"{name}_probabilities")(logits)
    return tf.keras.Model(unet.inputs, probabilities, name=name)


@dataclass
class LabelledVolumes:
    """Scans on the network grid with their manual labels (the supervised U-Net's data).

    ``images``: ``(N, x, y, z)`` float32; ``label_channels``: ``(N, x, y, z)`` channel of each
    voxel's label in the label table.
    """
    images: np.ndarray
    label_channels: np.ndarray
    n_channels: int
    subjects: List[str]

    @property
    def labelled_subjects(self) -> List[str]:
        return list(self.subjects)

    def describe(self) -> dict:
        return {"kind": "labelled scans", "subjects": list(self.subjects)}

    def batch(self, seed: int, step: int, batch_size: int = 1):
        """``(images (b, x, y, z, 1), one-hot targets (b, x, y, z, C))`` for ``step``."""
        picks = draw_rng(seed, step).integers(len(self.images), size=batch_size)
        eye = np.eye(self.n_channels, dtype=np.float32)
        return (self.images[picks][..., None].astype(np.float32),
                eye[self.label_channels[picks]])


def load_labelled_volumes(config: SegNetConfig, table: LabelTable,
                          subjects: Optional[Sequence[str]] = None) -> LabelledVolumes:
    """``subjects`` (default ``data.train_subjects``) with their labels, on the network grid."""
    subjects = list(subjects if subjects is not None else config.data.train_subjects)
    prepared = prepare_subjects(config.data, subjects, with_labels=True, table=table)
    return LabelledVolumes(
        np.stack([p.image for p in prepared]).astype(np.float32),
        np.stack([table.to_channels(p.labels, source=p.label_path) for p in prepared]),
        table.n_channels, [p.subject for p in prepared])


@dataclass
class SegNetTrainResult:
    run_dir: Path
    steps_done: int
    resumed_from: int
    model: object
    source: object
    seconds_per_step: float = float("nan")


def training_source(config: SegNetConfig, run_dir, table: LabelTable, verbose: int = 1):
    """What the segmenter trains on: the labelled training scans (``supervised``) or volumes
    synthesised from the atlas (``dataaug``, which first trains its appearance model)."""
    if config.method == "dataaug":
        return dataaug.prepare_synthetic_source(config, run_dir, table, verbose)
    return load_labelled_volumes(config, table)


def train_segnet(config: SegNetConfig, run_dir, source=None, verbose: int = 1
                 ) -> SegNetTrainResult:
    """Train (or resume) the segmentation U-Net of ``config`` in ``run_dir``.

    ``source`` (an object with ``batch(seed, step, batch_size)``, ``labelled_subjects`` and
    ``describe()``) overrides :func:`training_source`.
    """
    import tensorflow as tf
    run_dir = Path(run_dir)
    check_resume_config(run_dir, config, load_segnet_config)
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    train = config.train
    tf.keras.utils.set_random_seed(train.seed)
    if source is None:
        source = training_source(config, run_dir, table, verbose)
    # Seeded again here so the initial weights do not depend on what the source drew.
    tf.keras.utils.set_random_seed(train.seed)
    model = build_segnet(config.data.network_shape, table.n_channels, config.network)
    optimizer = tf.keras.optimizers.Adam(train.learning_rate)

    run_dir.mkdir(parents=True, exist_ok=True)
    save_segnet_config(config, run_dir / "config.yaml")
    atomic_write_text(run_dir / "environment.json", json.dumps(environment_record(train.seed),
                                                               indent=2))
    atomic_write_text(run_dir / RUN_RECORD, json.dumps({
        "method": config.method, "labels_tsv": str(config.data.resolved_labels_tsv()),
        "label_ids": [int(i) for i in table.ids], "network_shape": list(config.data.network_shape),
        "crop_shape": list(config.data.crop_shape), "factor": config.data.factor,
        "labelled_subjects": list(source.labelled_subjects), "training_data": source.describe()},
        indent=2))

    def loss_fn(net, images, targets):
        return segmentation_loss_terms(targets, net(images, training=True), train.dice_weight,
                                       train.cross_entropy_weight)

    result = train_loop(model, optimizer, loss_fn,
                        lambda step: source.batch(train.seed, step, train.batch_size),
                        run_dir, train.steps, train.log_every, train.checkpoint_every,
                        SEGNET_WEIGHTS, verbose, label=f"{run_dir.name} segnet")
    return SegNetTrainResult(run_dir, result.steps_done, result.resumed_from, model, source,
                             result.seconds_per_step)


# ----------------------------------------------------------------------------- prediction

def _block_centre_weights(n_network: int, factor: int):
    """For each of the ``n_network * factor`` cropped voxels along one axis: the lower network
    voxel and the weight of the upper one, linear between block centres and constant beyond
    the outermost ones (the interpolation of ``GridSpec.field_to_original``)."""
    position = (np.arange(n_network * factor) - (factor - 1) / 2.0) / factor
    position = np.clip(position, 0, n_network - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), max(n_network - 2, 0))
    upper = np.minimum(lower + 1, n_network - 1)
    return lower, upper, (position - lower).astype(np.float32)


def _interpolate_axis(array, axis: int, lower, upper, weight):
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    return (np.take(array, lower, axis=axis) * (1.0 - weight)
            + np.take(array, upper, axis=axis) * weight)


def probabilities_to_channels(probabilities, grid: GridSpec,
                              slab: int = PREDICTION_SLAB) -> np.ndarray:
    """Network-grid probabilities ``(x, y, z, C)`` -> channel map on the scan's own grid.

    Each channel is interpolated linearly between the network voxels' block centres (as
    :func:`ltnet_keras.inference.segment.field_to_grid` brings a field to the scan's grid) and every
    voxel takes the most probable channel; outside the crop is background (channel 0).
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.shape[:3] != tuple(grid.network_shape) or probabilities.ndim != 4:
        raise ValueError(f"probabilities of shape {probabilities.shape} do not match the "
                         f"network grid {grid.network_shape} + (channels,)")
    f = grid.factor
    axes = [_block_centre_weights(n, f) for n in grid.network_shape]
    cropped = np.zeros(grid.crop_shape, dtype=np.int32)
    lower_x, upper_x, weight_x = axes[0]
    for first in range(0, grid.crop_shape[0], slab):
        rows = slice(first, min(first + slab, grid.crop_shape[0]))
        block = _interpolate_axis(probabilities, 0, lower_x[rows], upper_x[rows], weight_x[rows])
        block = _interpolate_axis(block, 1, *axes[1])
        block = _interpolate_axis(block, 2, *axes[2])
        cropped[rows] = np.argmax(block, axis=-1)
    return grid.uncrop(cropped, fill=0)


@dataclass
class SegNetSegmentation:
    """One scan's label map ``(X, Y, Z)`` on its own grid, with its affine and header."""
    subject: str
    labels: np.ndarray
    affine: np.ndarray
    header: object
    seconds: Dict[str, float] = field(default_factory=dict)


class SegNetPredictor:
    """Loads a finished segmentation run and labels scans one after another."""

    def __init__(self, run_dir):
        import tensorflow as tf
        run_dir = Path(run_dir)
        for needed in ("config.yaml", RUN_RECORD, SEGNET_WEIGHTS):
            if not (run_dir / needed).exists():
                raise VolumeError(run_dir / needed, "missing: not a finished segmentation run")
        self.config = load_segnet_config(run_dir / "config.yaml")
        record = json.loads((run_dir / RUN_RECORD).read_text())
        self.table = LabelTable.from_ids(record["label_ids"])
        self.model = build_segnet(self.config.data.network_shape, self.table.n_channels,
                                  self.config.network)
        self.model.load_weights(str(run_dir / SEGNET_WEIGHTS))
        model = self.model

        @tf.function(reduce_retracing=True)
        def predict(image):
            return model(image, training=False)[0]
        self._predict = predict

    def prepare(self, image_path) -> PreparedSubject:
        data = self.config.data
        return prepare_volumes(load_image(image_path), None, data.crop_shape, data.factor,
                               subject_id(image_path))

    def probabilities(self, prepared: PreparedSubject) -> np.ndarray:
        """``(x, y, z, C)`` label probabilities on the network grid."""
        return self._predict(prepared.image[None, ..., None].astype(np.float32)).numpy()

    def segment(self, image_path) -> SegNetSegmentation:
        seconds = {}
        clock = time.perf_counter()
        prepared = self.prepare(image_path)
        seconds["read_prepare"] = time.perf_counter() - clock
        clock = time.perf_counter()
        probabilities = self.probabilities(prepared)
        seconds["network"] = time.perf_counter() - clock
        clock = time.perf_counter()
        channels = probabilities_to_channels(probabilities, prepared.grid)
        seconds["labels_to_scan_grid"] = time.perf_counter() - clock
        return SegNetSegmentation(prepared.subject, self.table.to_ids(channels), prepared.affine,
                                  prepared.header, seconds)


def segment_and_score(run_dir, subjects: Sequence[str], out_dir=None
                      ) -> List[evaluation.SubjectScores]:
    """Label ``subjects`` with the run's U-Net (written to ``out_dir``, default
    ``run_dir/segmentations/``) and score them against their manual labels."""
    predictor = SegNetPredictor(run_dir)
    config = predictor.config
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    if list(table.ids) != list(predictor.table.ids):
        raise VolumeError(config.data.resolved_labels_tsv(), "label ids differ from those the "
                          f"run {run_dir} was trained with")
    out_dir = Path(out_dir or Path(run_dir) / SEGMENTATIONS_DIR)
    scores = []
    for files in subject_files(config.data, subjects):
        if files.label is None:
            raise VolumeError(files.image, "no label map to score this subject against")
        result = predictor.segment(files.image)
        save_volume(result.labels, out_dir / f"{files.id}{output_suffix(files.image)}",
                    result.affine, result.header)
        truth = load_label_map(files.label).array
        scores.append(evaluation.evaluate_pair(result.labels, truth, table, files.id))
    return scores


def spatial_run_digest(config: SegNetConfig) -> Optional[str]:
    """The digest of the VoxelMorph weights a DataAug run synthesises with (None otherwise)."""
    if config.method != "dataaug":
        return None
    from ltnet_keras.training import FORWARD_WEIGHTS
    weights = Path(config.dataaug.spatial_run) / FORWARD_WEIGHTS
    return file_digest(weights) if weights.exists() else None


def finished_scores(run_dir, config: SegNetConfig) -> Optional[List[evaluation.SubjectScores]]:
    """The scores of a finished run made with exactly ``config`` (None if it must be redone):
    same config, scores newer than the weights, every validation subject, and for DataAug the
    same VoxelMorph weights as when it was trained."""
    import yaml
    run_dir = Path(run_dir)
    scores, weights = run_dir / SCORES, run_dir / SEGNET_WEIGHTS
    if not (scores.exists() and weights.exists() and (run_dir / "config.yaml").exists()):
        return None
    if yaml.safe_load((run_dir / "config.yaml").read_text()) != segnet_config_to_dict(config):
        return None
    if scores.stat().st_mtime < weights.stat().st_mtime:
        return None
    if config.method == "dataaug":
        record_path = run_dir / dataaug.RECORD
        if not record_path.exists():
            return None
        if json.loads(record_path.read_text()).get("spatial_weights_sha256") != \
                spatial_run_digest(config):
            return None
    read = evaluation.read_scores_csv(scores)
    if [s.subject for s in read] != list(config.data.val_subjects):
        return None
    return read


def run_segnet_experiment(config: SegNetConfig, run_dir, verbose: int = 1
                          ) -> List[evaluation.SubjectScores]:
    """Train (or resume) the U-Net, score ``data.val_subjects`` and write ``scores_segnet.csv``,
    ``summary.csv`` and ``results.md``; a finished, scored run is read back instead."""
    run_dir = Path(run_dir)
    done = finished_scores(run_dir, config)
    if done is not None:
        print(f"[{run_dir.name}] finished and scored: reading {SCORES}")
        return done
    result = train_segnet(config, run_dir, verbose=verbose)
    scores = segment_and_score(run_dir, list(config.data.val_subjects))
    title = (f"{config.name}: segmentation U-Net ({config.method}), {result.steps_done} steps, "
             f"network grid {config.data.network_shape}, labels of "
             f"{', '.join(result.source.labelled_subjects)}")
    evaluation.report(run_dir, {"segnet": scores}, title)
    return scores
