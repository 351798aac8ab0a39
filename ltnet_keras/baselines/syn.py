"""ANTs SyN registration of one labelled atlas to one target scan, the registration of the
multi-atlas baseline (:mod:`ltnet_keras.baselines.multi_atlas`), with a cache that keeps each
(atlas, target) registration once (Avants et al., Medical Image Analysis 12(1), 2008).
"""
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.records import atomic_write_text, read_keyed_record

SYN_TRANSFORMS = ("SyN", "SyNOnly")
LABEL_INTERPOLATORS = ("nearestNeighbor", "genericLabel")

@dataclass
class SynSettings:
    """How :func:`register_atlas` runs ANTs.

    Both scans are resampled to ``spacing`` mm voxels (anti-aliased, along the target's axes)
    and registered there with ``ants.registration(type_of_transform=transform)``: "SyN" is an
    affine stage (mutual information, 4x2x2x1 shrink) then SyN (``metric``, Gaussian-smoothed
    velocity, ``iterations`` per level at shrink factors 4x2x1 of the ``spacing`` grid);
    "SyNOnly" skips the affine stage. The transforms are then applied to the atlas' labels
    (``label_interpolator``) and image (linear) on the TARGET's full-resolution grid, so the
    result is scored where the manual labels are. ``seed`` fixes the metric's samples: with
    one ITK thread (:func:`ltnet_keras.data.align.load_ants`) a registration is the same bit for
    bit from run to run.

    Default: 3 mm, affine + SyN with Mattes mutual information, (100, 70, 50) iterations,
    nearest-neighbour labels: 10-12 s of registration and 2 s of warping per LPBA40 pair on
    one core (S13 to S31: 9.7 s, mean Dice 66.8 % unregistered, 75.4 % registered; S14 to
    S32: 12.2 s, 58.1 % to 69.3 %). Fewer iterations at the finest level cost Dice: (100,
    70, 5) takes 4-5 s for 0.4-0.9 points less, 4 mm voxels 3-4 s for ~1 point less;
    genericLabel instead of nearest neighbour adds ~10 s per pair for ~0.3 points.
    """
    spacing: float = 3.0
    transform: str = "SyN"
    metric: str = "mattes"
    iterations: tuple = (100, 70, 50)
    label_interpolator: str = "nearestNeighbor"
    seed: int = 1

    def __post_init__(self):
        self.iterations = tuple(int(i) for i in self.iterations)
        if self.transform not in SYN_TRANSFORMS:
            raise ValueError(f"unknown SyN transform {self.transform!r}; valid: "
                             f"{', '.join(SYN_TRANSFORMS)}")
        if self.label_interpolator not in LABEL_INTERPOLATORS:
            raise ValueError(f"unknown label interpolator {self.label_interpolator!r}; valid: "
                             f"{', '.join(LABEL_INTERPOLATORS)}")
        if self.metric not in ("mattes", "CC", "meansquares"):
            raise ValueError(f"unknown SyN metric {self.metric!r}; valid: mattes, CC, "
                             "meansquares")
        if self.spacing <= 0:
            raise ValueError(f"registration spacing must be > 0 mm, not {self.spacing}")
        if not self.iterations or min(self.iterations) < 0:
            raise ValueError(f"SyN iterations must be >= 0 per level, not {self.iterations}")
        if int(self.seed) != self.seed or self.seed < 1:
            # ANTs reads --random-seed 0 as "seed from the clock".
            raise ValueError(f"registration seed must be an integer >= 1, not {self.seed}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def describe(self) -> str:
        stages = "affine + SyN" if self.transform == "SyN" else "SyN only"
        return (f"ANTs {stages} ({self.metric}, iterations {'x'.join(map(str, self.iterations))}) "
                f"at {self.spacing:g} mm, labels warped ({self.label_interpolator}) onto each "
                f"target's 1 mm grid, seed {self.seed}, one ITK thread")


#: Coarse registration for smoke runs and tests: checks the pipeline, not a result.
SMOKE_SYN = SynSettings(spacing=6.0, iterations=(20, 10, 0))


@dataclass
class WarpedAtlas:
    """One atlas on one target's grid: its labels (int32), its intensity-normalised image
    (float32) and the seconds the registration and warping took when computed."""
    atlas: str
    target: str
    labels: np.ndarray
    image: np.ndarray
    seconds: float


def register_atlas(atlas_image, atlas_labels, target,
                   settings: Optional[SynSettings] = None) -> WarpedAtlas:
    """Register the atlas (moving) to the target (fixed) with ANTs SyN and warp the atlas'
    labels and image onto the target's grid (:class:`SynSettings`). Arguments are
    :class:`ltnet_keras.data.io.Volume` objects; the atlas' labels are on its image's grid."""
    from ltnet_keras.data.align import _ants_seed, _to_ants, axis_codes, load_ants, registration_image
    from ltnet_keras.data.io import Volume, subject_id
    from ltnet_keras.data.preprocess import normalise_intensity
    settings = settings or SynSettings()
    ants = load_ants()
    clock = time.perf_counter()
    codes = axis_codes(target.affine)
    fixed = _to_ants(registration_image(target, codes, settings.spacing))
    moving = _to_ants(registration_image(atlas_image, codes, settings.spacing))
    normalised = normalise_intensity(atlas_image.array, source=atlas_image.path)
    with tempfile.TemporaryDirectory(prefix="ltnet_syn_") as folder, _ants_seed(settings.seed):
        try:
            result = ants.registration(
                fixed, moving, type_of_transform=settings.transform,
                outprefix=os.path.join(folder, "atlas_to_target_"), syn_metric=settings.metric,
                reg_iterations=settings.iterations)
        except RuntimeError as error:
            raise VolumeError(atlas_image.path, f"ANTs SyN could not register this atlas to "
                                                f"{target.path} ({error})") from error
        grid = _to_ants(target)
        labels = ants.apply_transforms(
            grid, _to_ants(Volume(atlas_labels.array.astype(np.float32), atlas_labels.affine,
                                  None, atlas_labels.path)),
            result["fwdtransforms"], interpolator=settings.label_interpolator)
        image = ants.apply_transforms(
            grid, _to_ants(Volume(normalised, atlas_image.affine, None, atlas_image.path)),
            result["fwdtransforms"], interpolator="linear")
    seconds = time.perf_counter() - clock
    return WarpedAtlas(subject_id(atlas_image.path), subject_id(target.path),
                       np.rint(labels.numpy()).astype(np.int32),
                       image.numpy().astype(np.float32), seconds)


def _file_key(path) -> dict:
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class RegistrationCache:
    """Registrations kept in ``folder`` as ``<atlas>_to_<target>_labels.nii.gz``,
    ``..._image.nii.gz`` and ``....json`` (what they were computed from, and how long it
    took), reused while the three files and the settings stay the same."""

    def __init__(self, folder, settings: Optional[SynSettings] = None, table=None):
        self.folder = Path(folder)
        self.settings = settings or SynSettings()
        self.table = table
        #: Registrations computed (not read back) by this cache object.
        self.registrations_run = 0

    def _paths(self, atlas: str, target: str):
        stem = self.folder / f"{atlas}_to_{target}"
        return (stem.with_name(stem.name + ".json"), stem.with_name(stem.name + "_labels.nii.gz"),
                stem.with_name(stem.name + "_image.nii.gz"))

    def _key(self, atlas_files, target_files) -> dict:
        return {"atlas_image": _file_key(atlas_files.image),
                "atlas_labels": _file_key(atlas_files.label),
                "target_image": _file_key(target_files.image),
                "settings": self.settings.to_dict()}

    def _read(self, atlas_files, target_files) -> Optional[WarpedAtlas]:
        from ltnet_keras.data.io import load_image, load_label_map
        record_path, labels_path, image_path = self._paths(atlas_files.id, target_files.id)
        if not (labels_path.exists() and image_path.exists()):
            return None
        record = read_keyed_record(record_path, self._key(atlas_files, target_files))
        if record is None:
            return None
        return WarpedAtlas(atlas_files.id, target_files.id, load_label_map(labels_path).array,
                           load_image(image_path).array, float(record["seconds"]))

    def warped_atlas(self, atlas_files, target_files, target=None) -> WarpedAtlas:
        """The atlas (``SubjectFiles`` with labels) registered to the target (``SubjectFiles``):
        read back when kept, else computed with :func:`register_atlas` and kept. ``target``:
        the target's Volume if already loaded."""
        from ltnet_keras.data.io import load_image, load_subject, save_volume
        if atlas_files.label is None:
            raise VolumeError(atlas_files.image, "an atlas needs a label map; none found")
        kept = self._read(atlas_files, target_files)
        if kept is not None:
            return kept
        atlas_image, atlas_labels = load_subject(atlas_files.image, atlas_files.label, self.table)
        target = target if target is not None else load_image(target_files.image)
        warped = register_atlas(atlas_image, atlas_labels, target, self.settings)
        self.registrations_run += 1
        record_path, labels_path, image_path = self._paths(atlas_files.id, target_files.id)
        save_volume(warped.labels, labels_path, target.affine)
        save_volume(warped.image, image_path, target.affine)
        atomic_write_text(record_path, json.dumps(
            {"key": self._key(atlas_files, target_files), "seconds": warped.seconds}, indent=2))
        return warped
