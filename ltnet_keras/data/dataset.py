"""Subjects on the network grid, and the ``tf.data`` pipeline of (atlas, atlas labels, target).

Pairs are drawn as a pure function of (seed, step), so a resumed run sees exactly the pairs the
uninterrupted run would have seen.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras.config import DataConfig
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import (SubjectFiles, Volume, find_subjects, load_subject,
                                 save_volume, subject_id)
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.data.preprocess import GridSpec, normalise_intensity


@dataclass
class PreparedSubject:
    """One scan on the network grid ``(x, y, z)``; ``grid`` maps it back to its own file's grid."""
    subject: str
    image: np.ndarray
    labels: Optional[np.ndarray]
    grid: GridSpec
    affine: np.ndarray
    image_path: str
    label_path: Optional[str] = None
    header: object = None


def prepare_subject(image_path, label_path=None, crop_shape=(160, 192, 160), factor=1,
                    table: Optional[LabelTable] = None, subject: str = "") -> PreparedSubject:
    """Load, check, normalise to [0, 1], crop around the brain and down-sample one scan."""
    image, labels = load_subject(image_path, label_path, table)
    return prepare_volumes(image, labels, crop_shape, factor, subject)


def prepare_volumes(image: Volume, labels: Optional[Volume], crop_shape, factor,
                    subject: str = "", grid: Optional[GridSpec] = None) -> PreparedSubject:
    """:func:`prepare_subject` for volumes already loaded (and checked) by ``data.io``;
    ``grid``: a given crop window (the atlas', ``data.crop: atlas``) instead of one centred
    on this scan's brain."""
    normalised = normalise_intensity(image.array, source=image.path)
    if grid is None:
        grid = GridSpec.centred_on(normalised, crop_shape, factor)
    elif tuple(grid.original_shape) != tuple(image.array.shape[:3]):
        raise VolumeError(image.path, f"grid {tuple(image.array.shape[:3])} is not the grid "
                                      f"{tuple(grid.original_shape)} its crop window is for")
    return PreparedSubject(
        subject=subject or subject_id(image.path),
        image=grid.to_network(normalised, "image"),
        labels=None if labels is None else grid.to_network(labels.array, "label"),
        grid=grid, affine=image.affine, image_path=image.path,
        label_path=None if labels is None else labels.path, header=image.header)


def subject_files(config: DataConfig, subjects: Sequence[str],
                  root=None) -> List[SubjectFiles]:
    """The files of ``subjects`` under ``root`` (default ``config.root``); unknown ids are an
    error listing them."""
    root = Path(root) if root is not None else config.resolved_root()
    available = find_subjects(root)
    missing = [s for s in subjects if s not in available]
    if missing:
        raise VolumeError(root, f"subjects {missing} not found (available: {sorted(available)})")
    return [available[s] for s in subjects]


def check_subject_files(files: Sequence[SubjectFiles],
                        table: Optional[LabelTable] = None) -> None:
    """Read and check every image and label map of ``files`` so that a bad file in a data
    folder is refused, by name, before any work starts (VolumeError): what ``data.io`` refuses
    (unreadable, not 3D, NaN/inf, a label map on another grid than its image, ids absent from
    ``table``) and images too constant to normalise. Label maps are checked even where only
    the image will be used: a broken one is a sign of a broken folder, not to be ignored."""
    for subject in files:
        image, _ = load_subject(subject.image, subject.label, table)
        normalise_intensity(image.array, source=image.path)


def prepare_subjects(config: DataConfig, subjects: Sequence[str], with_labels: bool,
                     table: Optional[LabelTable] = None,
                     atlas_grid: Optional[GridSpec] = None) -> List[PreparedSubject]:
    """:func:`prepare_subject` for each of ``subjects``; with ``atlas_grid``, cropped with that
    window instead of one centred on each brain."""
    prepared = []
    for files in subject_files(config, subjects):
        if with_labels and files.label is None:
            raise VolumeError(files.image, "no label map found for this subject")
        image, labels = load_subject(files.image, files.label if with_labels else None, table)
        prepared.append(prepare_volumes(image, labels, config.crop_shape, config.factor,
                                        files.id, atlas_grid))
    return prepared


def prepare_aligned_subjects(config: DataConfig, subjects: Sequence[str], atlas_image: Volume,
                             cache_dir=None,
                             atlas_grid: Optional[GridSpec] = None) -> List[PreparedSubject]:
    """:func:`prepare_subjects` (without labels) for scans registered affinely to the atlas
    first and resampled onto its grid (``data.align: affine``); with ``cache_dir`` every scan
    is aligned once and read back from there afterwards (e.g. when a run resumes), and the
    pool's similarities to the atlas set the thresholds ``ltnet segment`` checks new scans
    with (``cache_dir/alignment_check.json``, :func:`alignment_check.record_pool`). With
    ``atlas_grid`` every aligned scan is cropped with the atlas' window (``data.crop``)."""
    from ltnet_keras.data.align import AlignmentCache, register_affine, to_atlas_space
    from ltnet_keras.data.alignment_check import record_pool
    cache = None if cache_dir is None else AlignmentCache(cache_dir)
    prepared, alignments = [], {}
    for files in subject_files(config, subjects, config.resolved_train_root()):
        if cache is not None:
            aligned, alignment = cache.aligned(files.image, atlas_image)
        else:
            scan, _ = load_subject(files.image)
            alignment = register_affine(scan, atlas_image)
            aligned = to_atlas_space(scan, alignment)
        alignments[str(files.image)] = alignment
        prepared.append(prepare_volumes(aligned, None, config.crop_shape, config.factor, files.id,
                                        atlas_grid))
    record_pool(alignments, cache_dir)
    return prepared


def resolve_atlas(config: DataConfig) -> str:
    """``config.atlas``, or for ``"auto"`` the training scan closest to the pool's average."""
    if config.atlas != "auto":
        return config.atlas
    from ltnet_keras.data.atlas import select_atlas
    files = subject_files(config, config.train_subjects)
    return select_atlas({f.id: f.image for f in files}, measure="ncc", factor=2).subject


@dataclass
class TrainingData:
    """The labelled atlas and the unlabelled pool (the atlas itself is left out of the pool)."""
    atlas: PreparedSubject
    atlas_one_hot: np.ndarray
    targets: List[PreparedSubject]
    table: LabelTable
    #: ``data.extra_atlases``: further moving images of the pairs, with their one-hot labels.
    extra_atlases: List[PreparedSubject] = field(default_factory=list)
    extra_one_hot: List[np.ndarray] = field(default_factory=list)

    @property
    def target_images(self) -> np.ndarray:
        return np.stack([t.image for t in self.targets])


def load_training_data(config: DataConfig, atlas: Optional[str] = None,
                       cache_dir=None) -> TrainingData:
    """The atlas (with labels) and the unlabelled pool on the network grid; every file of
    ``config.train_subjects`` is checked first (:func:`check_subject_files`). With
    ``config.align == "affine"`` the pool is aligned to the atlas first (kept in
    ``cache_dir``, the run directory's ``aligned/``, when given)."""
    table = LabelTable.from_tsv(config.resolved_labels_tsv())
    # A pool from another collection has its own label protocol (unused here): images only.
    check_subject_files(subject_files(config, config.train_subjects, config.resolved_train_root()),
                        None if config.train_root else table)
    atlas = atlas or resolve_atlas(config)
    atlas_subject, = prepare_subjects(config, [atlas], with_labels=True, table=table)
    extra_ids = [s for s in config.extra_atlases if s != atlas]
    extra = prepare_subjects(config, extra_ids, with_labels=True, table=table)
    pool = [s for s in config.train_subjects if s != atlas and s not in extra_ids]
    if not pool:
        raise ValueError("the training pool is empty once the atlas is taken out")
    # The pool is used without labels: this is the one-shot setting.
    atlas_grid = atlas_subject.grid if config.resolved_crop() == "atlas" else None
    if config.align == "affine":
        atlas_image, _ = load_subject(atlas_subject.image_path)
        targets = prepare_aligned_subjects(config, pool, atlas_image, cache_dir, atlas_grid)
    else:
        targets = prepare_subjects(config, pool, with_labels=False, atlas_grid=atlas_grid)
    one_hot = table.one_hot(atlas_subject.labels, source=atlas_subject.label_path)
    extra_one_hot = [table.one_hot(s.labels, source=s.label_path) for s in extra]
    return TrainingData(atlas_subject, one_hot, targets, table, extra, extra_one_hot)


def pair_indices(n_targets: int, seed: int, start: int, stop: int):
    """Target index for each draw ``i`` in ``[start, stop)``: stateless, so resumable."""
    import tensorflow as tf
    draws = tf.data.Dataset.range(start, stop)
    return draws.map(lambda i: tf.random.stateless_uniform(
        [], seed=tf.stack([tf.cast(seed, tf.int64), i]), maxval=n_targets, dtype=tf.int64))


def training_dataset(data: TrainingData, global_batch: int, seed: int, start_step: int,
                     stop_step: int):
    """``tf.data`` of ``{"atlas", "atlas_labels", "atlas_label_index", "target"}`` batches,
    one pair per replica (``atlas_label_index``: the one-hot channel of each atlas voxel).
    With ``data.extra_atlases`` each pair's atlas is drawn too (the same stateless way, from a
    second stream), among the atlas and the extra atlases."""
    import tensorflow as tf
    if not data.extra_atlases:
        atlas = tf.constant(data.atlas.image[..., None])
        atlas_labels = tf.constant(data.atlas_one_hot)
        atlas_label_index = tf.constant(np.argmax(data.atlas_one_hot, -1).astype(np.int32))
    else:
        moving = [data.atlas, *data.extra_atlases]
        images = tf.constant(np.stack([a.image[..., None] for a in moving]))
        one_hots = tf.constant(np.stack([data.atlas_one_hot, *data.extra_one_hot]))
        indices = tf.constant(np.argmax(one_hots.numpy(), -1).astype(np.int32))
    targets = tf.constant(data.target_images[..., None])

    def pair(draw, index):
        if not data.extra_atlases:
            return {"atlas": atlas, "atlas_labels": atlas_labels,
                    "atlas_label_index": atlas_label_index, "target": tf.gather(targets, index)}
        which = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64) + 1, draw]),
                                            maxval=len(moving), dtype=tf.int64)
        return {"atlas": tf.gather(images, which), "atlas_labels": tf.gather(one_hots, which),
                "atlas_label_index": tf.gather(indices, which), "target": tf.gather(targets, index)}

    start, stop = start_step * global_batch, stop_step * global_batch
    draws = tf.data.Dataset.zip((tf.data.Dataset.range(start, stop),
                                 pair_indices(len(data.targets), seed, start, stop)))
    return (draws.map(pair, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(global_batch, drop_remainder=True).prefetch(2))


def write_prepared(subjects: Sequence[PreparedSubject], out_dir) -> Dict[str, str]:
    """Write network-grid volumes as voxelmorph-style .npz (``vol``, ``seg``) plus NIfTI."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for s in subjects:
        affine = s.grid.affine_of_network_grid(s.affine)
        arrays = {"vol": s.image, "affine": affine, "grid": np.array(json.dumps(s.grid.to_dict()))}
        if s.labels is not None:
            arrays["seg"] = s.labels
        path = out_dir / f"{s.subject}.npz"
        tmp = out_dir / f".{s.subject}.npz.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        save_volume(s.image, out_dir / f"{s.subject}_image.nii.gz", affine)
        if s.labels is not None:
            save_volume(s.labels, out_dir / f"{s.subject}_labels.nii.gz", affine)
        written[s.subject] = str(path)
    return written
