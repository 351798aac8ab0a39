"""Atlas selection: the training scan most similar to the anatomical average of the pool.

This is how VoxelMorph and LT-Net choose their one labelled atlas. The scans must already share
one grid (LPBA40 is affinely pre-aligned to S01), so the average is simply voxel-wise.
Numpy only (images are read with ``ltnet_keras.data.io``).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np

from ltnet_keras.data.errors import VolumeError

MEASURES = ("ncc", "mse")


@dataclass
class AtlasChoice:
    """The chosen subject and every candidate's similarity to the average, best first."""
    subject: str
    scores: Dict[str, float]
    measure: str

    @property
    def ranking(self) -> List[str]:
        return list(self.scores)


def _candidates(images):
    """``(id, image or path)`` pairs from a mapping id -> array/path or a sequence of paths."""
    if isinstance(images, Mapping):
        items = [(str(k), v) for k, v in images.items()]
    else:
        from ltnet_keras.data.io import subject_id
        items = [(subject_id(p), p) for p in images]
    if not items:
        raise ValueError("select_atlas needs at least one image")
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"subject ids must be unique; got {ids}")
    return items


def _is_path(value) -> bool:
    return isinstance(value, (str, Path))


def _prepare(value, factor, normalise) -> np.ndarray:
    if _is_path(value):
        from ltnet_keras.data.io import load_image
        array = load_image(value).array
    else:
        array = np.asarray(value, dtype=np.float32)
    array = array[(slice(None, None, factor),) * array.ndim]
    if normalise:
        from ltnet_keras.data.preprocess import normalise_intensity
        array = normalise_intensity(array, source=value if _is_path(value) else "")
    return array.astype(np.float64)


def _ncc(a, b) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def select_atlas(images, measure="ncc", factor=1, normalise=True) -> AtlasChoice:
    """Pick the scan most similar to the voxel-wise mean of all the given scans.

    ``images``: mapping subject id -> 3D array or image path, or a sequence of image paths (id =
    file name without extension). Each image is intensity-normalised
    (``preprocess.normalise_intensity``, when ``normalise``) and, for ``factor > 1``, sub-sampled
    with that stride, which makes selection fast at little cost in accuracy.

    ``measure="ncc"`` (default): global normalised cross-correlation, i.e. the Pearson
    correlation over all voxels of the image with the average. ``"mse"``: the negative mean
    squared difference, so that for both measures higher is more similar.

    The average is accumulated as a running sum, so the images are read twice but never held in
    memory together.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer; got {factor!r}")
    factor = int(factor)
    items = _candidates(images)

    total = None
    for subject, value in items:
        array = _prepare(value, factor, normalise)
        if total is None:
            total = np.zeros_like(array)
        elif array.shape != total.shape:
            # Name the file when there is one: that is what the user has to fix.
            raise VolumeError(value if _is_path(value) else "",
                              f"image of {subject} has shape {array.shape}, others "
                              f"{total.shape}; atlas selection needs co-registered images on "
                              "one grid")
        total += array
    average = total / len(items)

    scores = {}
    for subject, value in items:
        array = _prepare(value, factor, normalise)
        scores[subject] = (_ncc(array, average) if measure == "ncc"
                           else -float(np.mean((array - average) ** 2)))
    ranked = sorted(scores, key=lambda s: -np.inf if np.isnan(scores[s]) else scores[s],
                    reverse=True)
    return AtlasChoice(ranked[0], {s: scores[s] for s in ranked}, measure)


def select_atlas_aligned(images, passes: int = 2, factor: int = 2) -> AtlasChoice:
    """:func:`select_atlas` for scans that do NOT share a space (a FreeSurfer collection: every
    subject in its own conformed space): each scan is aligned affinely (ANTs,
    :func:`ltnet_keras.data.align.register_affine`) to a reference, the average is taken there
    and the scan closest to it (NCC) is chosen. The first reference is the first scan; each
    further pass aligns to the previous pass' choice, so the result does not hinge on which scan
    happened to be first (the scores of the last pass are returned).

    ``images``: mapping subject id -> image path, or a sequence of paths.
    """
    from ltnet_keras.data.align import register_affine, to_atlas_space
    from ltnet_keras.data.io import load_image
    items = _candidates(images)
    volumes = {subject: load_image(path) for subject, path in items}
    reference = items[0][0]
    choice = None
    for _ in range(max(int(passes), 1)):
        fixed = volumes[reference]
        aligned = {subject: (volume.array if subject == reference else
                             to_atlas_space(volume, register_affine(volume, fixed)).array)
                   for subject, volume in volumes.items()}
        choice = select_atlas(aligned, "ncc", factor)
        if choice.subject == reference:
            break
        reference = choice.subject
    return choice


def recorded_atlas_files(record: dict, data) -> Tuple[str, str]:
    """The run's atlas files. Paths are recorded relative to the data root (``data.root``, else
    ``$LTNET_DATA``): they are found under this machine's root. An absolute path (a record from
    before, or an atlas outside the root) is used only when the root has no such subject, so an
    old copy of the data elsewhere on the disk is never read instead of the root's."""
    root = data.resolved_root()
    image, labels = Path(record["image"]), Path(record["labels"])
    if not image.is_absolute() and not labels.is_absolute():
        image, labels = root / image, root / labels
        if image.exists() and labels.exists():
            return str(image), str(labels)
    else:
        from ltnet_keras.data.io import find_subjects
        found = find_subjects(root).get(record["atlas"]) if root.is_dir() else None
        if found is not None and found.label is not None:
            return str(found.image), str(found.label)
        if image.exists() and labels.exists():
            return str(image), str(labels)
    raise VolumeError(record["image"], f"atlas {record['atlas']} not found under the data root "
                      f"{root}; set data.root / $LTNET_DATA, or pass --atlas-image and "
                      "--atlas-labels")
