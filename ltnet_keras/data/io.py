"""Reading, checking and writing volumes: NIfTI (.nii, .nii.gz), FreeSurfer .mgz and
voxelmorph-style .npz (keys ``vol`` / ``seg``, optional ``affine``).

Every unusable input raises :class:`VolumeError`, whose message starts with the file path.
Images come back as float32 ``(x, y, z)`` arrays, label maps as int32 ``(x, y, z)`` arrays.
"""
import os
import secrets
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, ImageDataError

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.labels import LabelTable

__all__ = ["Volume", "SubjectFiles", "VolumeError", "EXTENSIONS", "load_image", "load_label_map",
           "load_subject", "check_same_grid", "grid_offset_mm", "save_volume", "find_subjects",
           "subject_id", "output_suffix"]

# Longest first so that ".nii.gz" wins over ".gz"-less ".nii" matching.
EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".npz")
WRITABLE = (".nii.gz", ".nii", ".mgz")
# Two volumes are on the same grid when they have the same shape and no voxel centre moves by
# more than this fraction of a voxel from one affine to the other: far below any real
# misregistration, far above float round-off in headers written by different tools.
GRID_TOLERANCE_VOXELS = 0.1
# A FreeSurfer subject's skull-stripped T1 and its segmentation, first choice first; either
# directly in the subject's folder or in its mri/ folder (a FreeSurfer SUBJECTS_DIR).
FREESURFER_IMAGES = ("brainmask.mgz", "norm.mgz", "T1.mgz")
FREESURFER_LABELS = ("aseg.mgz",)
_FORMAT_NAMES = {".npz": "numpy .npz archive", ".mgz": "FreeSurfer .mgz image"}

# What nibabel, gzip, zlib and numpy raise on truncated, corrupt or foreign files.
_READ_ERRORS = (ImageFileError, HeaderDataError, ImageDataError, OSError, EOFError, zlib.error,
                ValueError, struct.error, zipfile.BadZipFile)


@dataclass
class Volume:
    """A 3D array with its voxel-to-world ``affine`` (4x4), the header it was read with
    (``None`` for .npz) and the file it came from."""
    array: np.ndarray
    affine: np.ndarray
    header: Optional[object]
    path: str

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def voxel_size(self) -> Tuple[float, float, float]:
        """Voxel edge lengths in mm along the array axes (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def field_of_view(self) -> Tuple[float, float, float]:
        """Physical extent in mm along the world (scanner) x, y and z axes: the bounding box
        of the volume's outer voxel faces, i.e. shape x voxel size for an axis-aligned grid
        whatever its orientation (LAS, LIA, ...)."""
        faces = np.array([[-0.5, n - 0.5] for n in self.shape])
        corners = np.array(np.meshgrid(*faces, indexing="ij")).reshape(3, -1)
        world = self.affine[:3, :3] @ corners
        return tuple(float(v) for v in world.max(axis=1) - world.min(axis=1))


@dataclass
class SubjectFiles:
    """The files of one subject: an image and, if there is one, its label map."""
    id: str
    image: Path
    label: Optional[Path]


def _extension(path) -> Optional[str]:
    name = Path(path).name.lower()
    return next((ext for ext in EXTENSIONS if name.endswith(ext)), None)


def subject_id(path) -> str:
    """File name without .nii.gz/.nii/.mgz/.npz (or without its last suffix otherwise); for
    FreeSurfer's own file names (``sub-01/mri/brainmask.mgz``, ``sub-01/aseg.mgz``) the
    subject's folder name, since every subject's file has the same name."""
    path = Path(path)
    if path.name in FREESURFER_IMAGES + FREESURFER_LABELS and path.parent.name:
        folder = path.parent.parent if path.parent.name == "mri" else path.parent
        if folder.name:
            return folder.name
    ext = _extension(path.name)
    return path.name[:-len(ext)] if ext else Path(path.name).stem


def output_suffix(input_path) -> str:
    """The file type a result for ``input_path`` is written in: the input's own (``.mgz`` in,
    ``.mgz`` out; ``.nii`` / ``.nii.gz`` likewise), ``.nii.gz`` for anything not writable."""
    ext = _extension(input_path)
    return ext if ext in WRITABLE else ".nii.gz"


def _read(path, npz_key: str):
    """``(array, affine, header)`` of any supported file, every failure as VolumeError."""
    path = str(path)
    if not os.path.isfile(path):
        problem = "is a folder, not a file" if os.path.isdir(path) else "file not found"
        raise VolumeError(path, problem)
    ext = _extension(path)
    if ext is None:
        raise VolumeError(path, f"unsupported file type (expected one of {', '.join(EXTENSIONS)})")
    try:
        if ext == ".npz":
            return _read_npz(path, npz_key)
        image = nib.load(path)
        # nibabel reads lazily: pull the voxels now so that a truncated file fails here.
        array = np.asanyarray(image.dataobj)
        return array, np.asarray(image.affine, dtype=np.float64), image.header.copy()
    except VolumeError:
        raise
    except _READ_ERRORS as error:
        kind = _FORMAT_NAMES.get(ext, "NIfTI image")
        raise VolumeError(path, f"cannot read the file: it is truncated, corrupt or not a {kind} "
                                f"({type(error).__name__}: {error})") from error


def _read_npz(path, key):
    with np.load(path, allow_pickle=False) as archive:
        if key not in archive.files:
            raise VolumeError(path, f"the .npz archive has no '{key}' array "
                                    f"(it holds: {', '.join(archive.files) or 'nothing'})")
        array = archive[key]
        affine = archive["affine"] if "affine" in archive.files else np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeError(path, f"the 'affine' array must be 4x4, not {affine.shape}")
    return array, affine, None


def _as_3d(array, path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(path, f"expected a 3D volume, got a {array.ndim}D array of shape "
                                f"{tuple(array.shape)}")
    return array


def load_image(path) -> Volume:
    """Read an intensity image as float32 ``(x, y, z)``; rejects non-3D and NaN/inf voxels."""
    array, affine, header = _read(path, "vol")
    array = _as_3d(array, path)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VolumeError(path, f"image voxels must be real numbers, not {array.dtype}")
    array = np.asarray(array, dtype=np.float32)
    bad = np.count_nonzero(~np.isfinite(array))
    if bad:
        raise VolumeError(path, f"image contains {bad} NaN or infinite voxel(s)")
    return Volume(array, affine, header, str(path))


def load_label_map(path) -> Volume:
    """Read a label map as int32 ``(x, y, z)``; values must be integers and not all background."""
    array, affine, header = _read(path, "seg")
    array = _as_3d(array, path)
    if np.issubdtype(array.dtype, np.bool_):
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VolumeError(path, f"label map voxels must be integers, not {array.dtype}")
    if not np.issubdtype(array.dtype, np.integer):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise VolumeError(path, f"label map has {np.count_nonzero(bad)} non-integer voxel "
                                    f"value(s), e.g. {array[bad][0]!r}; a label map must hold "
                                    "integer label ids")
    if not np.any(array):
        raise VolumeError(path, "label map is empty (every voxel is background 0)")
    return Volume(array.astype(np.int32), affine, header, str(path))


def load_subject(image_path, label_path=None,
                 label_table: Optional[LabelTable] = None) -> Tuple[Volume, Optional[Volume]]:
    """Image and (optional) label map of one subject, checked to share shape and affine. With
    ``label_table``, ids the table leaves out become background (said once per file; a map
    with no id of the table is refused: :meth:`LabelTable.restrict`)."""
    image = load_image(image_path)
    if label_path is None:
        return image, None
    label = load_label_map(label_path)
    check_same_grid(label, image, "label map", "image")
    if label_table is not None:
        label.array = label_table.restrict(label.array, source=str(label_path))
    return image, label


def grid_offset_mm(shape, affine, reference_affine) -> float:
    """Largest distance in mm between where ``affine`` and ``reference_affine`` put the same
    voxel of a grid of ``shape``. The distance is affine in the voxel index, so its largest
    value over the grid is at one of the grid's eight corners."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    moved = (np.asarray(affine, np.float64) - np.asarray(reference_affine, np.float64)) @ corners
    return float(np.linalg.norm(moved[:3], axis=0).max())


def check_same_grid(volume: Volume, reference: Volume, what: str, reference_what: str) -> None:
    """Refuse ``volume`` unless it has the shape of ``reference`` and no voxel centre lies
    farther than :data:`GRID_TOLERANCE_VOXELS` (of the reference's smallest voxel size) from
    where the reference puts it; the message names both files and the offset in mm
    (``what`` and ``reference_what`` say what each file is)."""
    if volume.shape != reference.shape:
        raise VolumeError(volume.path, f"{what} shape {volume.shape} does not match the "
                                       f"{reference_what} shape {reference.shape} of "
                                       f"{reference.path}")
    offset = grid_offset_mm(volume.shape, volume.affine, reference.affine)
    tolerance = GRID_TOLERANCE_VOXELS * min(reference.voxel_size)
    if offset > tolerance:
        raise VolumeError(volume.path, f"{what} affine differs from the affine of the "
                                       f"{reference_what} {reference.path}: their voxel centres "
                                       f"are up to {offset:.2f} mm apart (tolerance "
                                       f"{tolerance:.2f} mm, {GRID_TOLERANCE_VOXELS} voxel)")


def _storage_dtype(array, path) -> np.dtype:
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return np.dtype(dtype)
        raise VolumeError(path, f"integer values {low}..{high} do not fit in int32")
    if np.issubdtype(array.dtype, np.floating):
        return np.dtype(np.float32)
    raise VolumeError(path, f"cannot write voxels of type {array.dtype}")


def _make_image(array, affine, header, ext):
    if ext == ".mgz":
        header = header if isinstance(header, nib.freesurfer.mghformat.MGHHeader) else None
        image = nib.MGHImage(array, affine, header=header)
        # The header may come from a float image: store these voxels in their own type.
        image.header.set_data_dtype(array.dtype)
        return image
    # Another format's header (e.g. MGH) cannot describe a NIfTI file: the affine suffices.
    header = header.copy() if isinstance(header, nib.Nifti1Header) else None
    image = nib.Nifti1Image(array, affine, header=header)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def save_volume(array, path, affine, header=None) -> Path:
    """Write a ``(x, y, z)`` (or ``(x, y, z, c)``) array as .nii, .nii.gz or .mgz, atomically.

    Integers are stored as uint8, int16 or int32 (the smallest that fits), floats as float32.
    The file is written to a hidden temporary name in the same folder and renamed into place,
    so ``path`` is either the complete new file or untouched, never partial.
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in WRITABLE:
        raise VolumeError(path, f"cannot write this file type (use one of {', '.join(WRITABLE)})")
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise VolumeError(path, f"can only write 3D or 4D arrays, not shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeError(path, f"affine must be 4x4, not {affine.shape}")
    array = array.astype(_storage_dtype(array, path), copy=False)
    image = _make_image(array, affine, header, ext)

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name[:-len(ext)]}.tmp-{secrets.token_hex(4)}{ext}")
    try:
        image.to_filename(str(temporary))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def find_subjects(root) -> Dict[str, SubjectFiles]:
    """Subjects of a data folder, sorted by id. Two layouts: ``root/images`` (and their label
    maps in ``root/labels``, matched by subject id), or one folder per subject as FreeSurfer
    writes them (``root/<id>/[mri/]brainmask.mgz`` with ``aseg.mgz``; see
    :data:`FREESURFER_IMAGES`)."""
    root = Path(root)
    if not root.is_dir():
        raise VolumeError(root, "data folder not found")
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        subjects = _freesurfer_subjects(root)
        if subjects:
            return subjects
        raise VolumeError(images_dir, "folder of images not found (and no subject folder "
                                      f"holds FreeSurfer's {' or '.join(FREESURFER_IMAGES)})")
    images = _volumes_by_id(images_dir)
    if not images:
        raise VolumeError(images_dir, f"no volumes ({', '.join(EXTENSIONS)}) in this folder")
    labels = _volumes_by_id(labels_dir) if labels_dir.is_dir() else {}
    return {sid: SubjectFiles(sid, images[sid], labels.get(sid)) for sid in sorted(images)}


def _first_file(folder: Path, names) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _freesurfer_subjects(root: Path) -> Dict[str, SubjectFiles]:
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for place in (folder, folder / "mri"):
            image = _first_file(place, FREESURFER_IMAGES)
            if image is not None:
                found[folder.name] = SubjectFiles(folder.name, image,
                                                  _first_file(place, FREESURFER_LABELS))
                break
    return found


def _volumes_by_id(folder: Path) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or _extension(path) is None:
            continue
        sid = subject_id(path)
        if sid in found:
            raise VolumeError(path, f"subject '{sid}' has two files here ({found[sid].name})")
        found[sid] = path
    return found
