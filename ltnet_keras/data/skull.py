"""Whole-head scans: is the skull still on, and if so, the brain by registration to a head
template whose brain mask is known (as ANTs' ``antsBrainExtraction`` does: affine + deformable
registration at a coarse resolution, the template's mask warped back and cleaned).

Detection (:func:`skull_check`): the scan's foreground (voxels above a tenth of its 99th
intensity percentile, largest connected piece, holes filled) measured in millilitres from the
header. A brain, skull-stripped, is 1.0-1.8 L (LPBA40's 31 scans and FreeSurfer's five
``brainmask.mgz`` here); a head with its scalp is 2.8-3.9 L (FreeSurfer's ``T1.mgz`` of
sub-01..04). :data:`HEAD_MIN_ML` sits between the two.

Head templates are pairs (whole-head image, brain mask on its grid): FreeSurfer subject folders
holding ``T1.mgz`` and ``brainmask.mgz`` (:func:`find_head_templates`), or given by hand. A
template is never used for its own scan (same file, or the same subject folder), so validation
on the template subjects is leave-one-out by construction.
"""
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ltnet_keras.data.alignment_check import foreground_mask
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import Volume, load_image

#: Foreground volume (mL) from which a scan is taken to have its skull on.
HEAD_MIN_ML = 2300.0
SKULL_MODES = ("auto", "on", "off")
#: File names of a head template in a subject folder (FreeSurfer's).
TEMPLATE_FILES = ("T1.mgz", "brainmask.mgz")


def check_skull_mode(mode: str) -> str:
    if mode not in SKULL_MODES:
        raise ValueError(f"unknown skull mode {mode!r}; valid: {', '.join(SKULL_MODES)} "
                         "(auto: detect; on: the scans have their skull; off: they are brains)")
    return mode


def largest_piece_filled(mask: np.ndarray) -> np.ndarray:
    """The largest connected piece of ``mask`` with its holes filled (empty if ``mask`` is)."""
    from scipy import ndimage
    labelled, count = ndimage.label(mask)
    if count > 1:
        mask = labelled == (np.argmax(np.bincount(labelled.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def foreground(array: np.ndarray) -> np.ndarray:
    """The scan's object: the largest piece of what the alignment check calls foreground
    (above a tenth of the 99th percentile of the nonzero voxels), holes filled."""
    return largest_piece_filled(foreground_mask(array))


@dataclass
class SkullCheck:
    """What :func:`skull_check` saw: the foreground's volume and the verdict."""
    foreground_ml: float
    has_skull: bool

    def describe(self) -> str:
        kind = "a whole head (skull on)" if self.has_skull else "a brain (skull stripped)"
        return (f"foreground {self.foreground_ml:.0f} mL: {kind}; threshold {HEAD_MIN_ML:.0f} mL")


def skull_check(volume: Volume) -> SkullCheck:
    """Whether ``volume`` still has its skull, from its foreground's volume in mL, measured
    on every other voxel along axes finer than 2 mm (8x less work on a 1 mm scan; a litre
    is ~1000 voxels of 8 mm^3 still)."""
    steps = [2 if size < 2.0 and n >= 64 else 1 for size, n in zip(volume.voxel_size,
                                                                    volume.shape)]
    sampled = volume.array[::steps[0], ::steps[1], ::steps[2]]
    voxel_ml = float(np.prod(volume.voxel_size) * np.prod(steps)) / 1000.0
    millilitres = float(foreground(sampled).sum()) * voxel_ml
    return SkullCheck(millilitres, millilitres >= HEAD_MIN_ML)


@dataclass(frozen=True)
class HeadTemplate:
    """A whole-head image and its brain mask (nonzero inside), on the same grid."""
    image: Path
    mask: Path

    @property
    def name(self) -> str:
        return f"{self.image.parent.name}/{self.image.name}"

    def is_for(self, scan_path) -> bool:
        """True when ``scan_path`` is this template's image or lies in its subject folder."""
        scan = Path(scan_path).resolve()
        return scan == self.image.resolve() or scan.parent == self.image.parent.resolve()


def parse_head_template(text: str) -> HeadTemplate:
    """``IMAGE:MASK`` -> :class:`HeadTemplate` (both files must exist)."""
    image, sep, mask = str(text).partition(":")
    if not sep or not image or not mask:
        raise ValueError(f"--head-template {text!r}: expected IMAGE:MASK (a whole-head image and "
                         "its brain mask on the same grid)")
    for path in (image, mask):
        if not Path(path).is_file():
            raise VolumeError(path, "head template file not found")
    return HeadTemplate(Path(image), Path(mask))


def find_head_templates(roots: Sequence) -> List[HeadTemplate]:
    """Subject folders under each root (``root/sub-XX/``, or ``root/sub-XX/mri/``) holding
    both :data:`TEMPLATE_FILES`, sorted by folder name; roots that do not exist are skipped."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for where in (folder, folder / "mri"):
                image, mask = (where / name for name in TEMPLATE_FILES)
                if image.is_file() and mask.is_file():
                    found.append(HeadTemplate(image, mask))
                    break
    return found


def default_brain_finder(data_root, mode: str = "auto",
                         templates: Optional[Sequence[HeadTemplate]] = None) -> "BrainFinder":
    """The reader ``ltnet segment`` uses: ``templates``, else the head templates found under
    :func:`default_template_roots` of ``data_root``."""
    if not templates:
        templates = find_head_templates(default_template_roots(data_root))
    return BrainFinder(mode, templates)


def default_template_roots(data_root) -> List[Path]:
    """Where head templates are looked for: the run's data root, then a ``freesurfer``
    collection beside it (``../shared/data/freesurfer`` for LPBA40-protocol runs)."""
    data_root = Path(data_root)
    return [data_root, data_root.parent / "freesurfer"]


@dataclass
class BrainExtractionSettings:
    """How :func:`extract_brain` registers the template (moving) to the scan (fixed): both
    resampled to ``spacing`` mm, ANTs ``transform`` ("SyN": affine then SyN; "Affine"), SyN
    ``iterations`` per level; the warped mask is cut at ``threshold`` and cleaned (largest
    piece, holes filled). ``templates``: how many templates vote (the first ones not made from
    the scan itself); a voxel is brain when more than half of them say so.

    Defaults from a small grid on sub-01 and sub-03 (``results/brain_extraction/grid.md``):
    4 mm with (40, 20, 0) iterations takes 8-10 s per 256^3 head for a brain-mask Dice of
    0.93-0.95 against FreeSurfer's; 3 mm with (60, 30, 10) doubles the time for +0.005-0.01;
    the cut (0.4-0.7) changes the Dice by less than 0.003."""
    spacing: float = 4.0
    transform: str = "SyN"
    iterations: Tuple[int, ...] = (40, 20, 0)
    threshold: float = 0.5
    templates: int = 1
    seed: int = 1

    def to_dict(self) -> dict:
        return {"spacing": self.spacing, "transform": self.transform,
                "iterations": list(self.iterations), "threshold": self.threshold,
                "templates": self.templates, "seed": self.seed}


@dataclass
class BrainExtraction:
    """The brain of a whole-head scan: ``mask`` (bool, the scan's grid), ``brain`` (the scan
    with zeros outside), which templates were used and the seconds it took."""
    mask: np.ndarray
    brain: Volume
    templates: List[str]
    check: SkullCheck
    seconds: Dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        return {"skull": True, "foreground_ml": self.check.foreground_ml,
                "templates": self.templates, "brain_ml": float(
                    self.mask.sum() * np.prod(self.brain.voxel_size) / 1000.0)}


def _warped_mask(scan: Volume, template: HeadTemplate,
                 settings: BrainExtractionSettings) -> np.ndarray:
    """The template's brain mask on the scan's grid (float in [0, 1], linear interpolation)."""
    from ltnet_keras.data.align import _ants_seed, _to_ants, load_ants
    from ltnet_keras.data.grids import axis_codes, registration_image
    ants = load_ants()
    head = load_image(template.image)
    mask = load_image(template.mask)
    if mask.shape != head.shape:
        raise VolumeError(template.mask, f"head template mask shape {mask.shape} differs from "
                                         f"its image's {head.shape} ({template.image})")
    codes = axis_codes(scan.affine)
    fixed = _to_ants(registration_image(scan, codes, settings.spacing))
    moving = _to_ants(registration_image(head, codes, settings.spacing))
    with tempfile.TemporaryDirectory(prefix="ltnet_brain_") as folder, _ants_seed(settings.seed):
        try:
            result = ants.registration(fixed, moving, type_of_transform=settings.transform,
                                       outprefix=f"{folder}/template_to_scan_",
                                       reg_iterations=tuple(settings.iterations))
        except RuntimeError as error:
            raise VolumeError(scan.path, f"ANTs could not register the head template "
                                         f"{template.image} to this scan ({error})") from error
        inside = Volume((mask.array > 0).astype(np.float32), mask.affine, None, mask.path)
        warped = ants.apply_transforms(_to_ants(scan), _to_ants(inside),
                                       result["fwdtransforms"], interpolator="linear")
    return warped.numpy().astype(np.float32)


def extract_brain(scan: Volume, templates: Sequence[HeadTemplate],
                  settings: Optional[BrainExtractionSettings] = None,
                  check: Optional[SkullCheck] = None) -> BrainExtraction:
    """The brain of the whole-head ``scan`` from the first ``settings.templates`` of
    ``templates`` not made from it (refused, naming the scan, when there is none)."""
    settings = settings or BrainExtractionSettings()
    usable = [t for t in templates if not t.is_for(scan.path)][:settings.templates]
    if not usable:
        raise VolumeError(scan.path, "the scan has its skull on (" + (check or skull_check(
            scan)).describe() + ") and no head template is available to take it off: give "
            "--head-template IMAGE:MASK, or put subject folders with T1.mgz and brainmask.mgz "
            "in the data root")
    clock = time.perf_counter()
    votes = sum((_warped_mask(scan, t, settings) >= settings.threshold).astype(np.int16)
                for t in usable)
    mask = votes * 2 > len(usable)
    if not mask.any():
        raise VolumeError(scan.path, "brain extraction found no brain (the head templates did "
                                     "not register to this scan)")
    mask = largest_piece_filled(mask)
    brain = Volume(np.where(mask, scan.array, 0).astype(scan.array.dtype), scan.affine,
                   scan.header, scan.path)
    return BrainExtraction(mask, brain, [t.name for t in usable], check or skull_check(scan),
                           {"brain_extraction": time.perf_counter() - clock})


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


class BrainFinder:
    """Reads scans for segmentation: a scan found to have its skull on (``mode`` "auto", or
    always with "on") comes back as its brain (:func:`extract_brain`), with the extraction;
    "off" reads scans as they are. Each scan's brain mask is kept (bit-packed, 2 MB for a
    256^3 scan) while the file is unchanged, so checking a batch and then segmenting it
    extracts every brain once."""

    def __init__(self, mode: str = "auto", templates: Sequence[HeadTemplate] = (),
                 settings: Optional[BrainExtractionSettings] = None):
        self.mode = check_skull_mode(mode)
        self.templates = list(templates)
        self.settings = settings or BrainExtractionSettings()
        self._masks: Dict[tuple, tuple] = {}

    def read(self, path) -> Tuple[Volume, Optional[BrainExtraction]]:
        scan = load_image(path)
        if self.mode == "off":
            return scan, None
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._masks:
            check = skull_check(scan)
            extraction = None
            if self.mode == "on" or check.has_skull:
                extraction = extract_brain(scan, self.templates, self.settings, check)
            self._masks[key] = None if extraction is None else (
                np.packbits(extraction.mask), extraction.templates, extraction.check,
                extraction.seconds)
            return (scan if extraction is None else extraction.brain), extraction
        kept = self._masks[key]
        if kept is None:
            return scan, None
        packed, templates, check, seconds = kept
        mask = np.unpackbits(packed, count=int(np.prod(scan.shape))).reshape(scan.shape) > 0
        brain = Volume(np.where(mask, scan.array, 0).astype(scan.array.dtype), scan.affine,
                       scan.header, scan.path)
        return brain, BrainExtraction(mask, brain, templates, check, dict(seconds))
