"""Label maps over their scans, as a person looks at them: three orthogonal planes through the
labelled centre, in RAS display (left of the picture = the subject's right in axial and
coronal views, as radiologists read them; superior up), every label in a fixed colour."""
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

#: Planes and their axis in RAS voxel order (sagittal = fixed x, coronal = fixed y, axial = z).
PLANES = (("sagittal", 0), ("coronal", 1), ("axial", 2))


def label_colours(ids: Sequence[int]) -> Dict[int, np.ndarray]:
    """A fixed RGB colour per label id (the same in every panel, run and report)."""
    rng = np.random.default_rng(7)
    return {int(i): rng.uniform(0.15, 1.0, 3) for i in sorted(int(i) for i in ids)}


def overlay(image_slice: np.ndarray, label_slice: np.ndarray, colours, alpha=0.45) -> np.ndarray:
    """RGB of a grey slice with its labels blended in (background left grey)."""
    top = float(np.percentile(image_slice, 99.5)) if image_slice.size else 1.0
    grey = np.clip(image_slice / max(top, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for label, colour in colours.items():
        inside = label_slice == label
        if inside.any():
            rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colour
    return rgb


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` with its voxel axes permuted and flipped to run R, A, S (no resampling)."""
    import nibabel as nib
    ornt = nib.orientations.io_orientation(np.asarray(affine, np.float64))
    return nib.orientations.apply_orientation(array, ornt)


def plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice at ``index`` along ``axis`` of a RAS volume, rows running superior-up when
    shown with ``origin="lower"`` (axial: anterior up), and with the subject's right on the
    viewer's left (radiological)."""
    cut = np.take(volume, index, axis=axis).T
    return cut if axis == 0 else cut[:, ::-1]


def labelled_centre(labels: np.ndarray) -> np.ndarray:
    inside = np.nonzero(labels > 0)
    if not inside[0].size:
        return np.array(labels.shape) // 2
    return np.array([int(round(c.mean())) for c in inside])


def write_planes_png(path, image: np.ndarray, affine, columns: Dict[str, Optional[np.ndarray]],
                     colours, title: str = "", dpi: int = 80,
                     planes_across: bool = False) -> Path:
    """Sagittal, coronal and axial planes through the labelled centre, one panel per plane and
    per entry of ``columns`` (``None``: the scan alone; a label map on ``image``'s grid: its
    overlay). Planes run down the rows and entries across, or with ``planes_across`` the other
    way round (a strip per entry, for thumbnails)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    image = to_ras(np.asarray(image, np.float32), affine)
    maps = {k: None if v is None else to_ras(np.asarray(v), affine) for k, v in columns.items()}
    reference = next((v for v in maps.values() if v is not None), None)
    centre = labelled_centre(reference) if reference is not None else np.array(image.shape) // 2
    shape = (len(maps), len(PLANES)) if planes_across else (len(PLANES), len(maps))
    fig, axes = plt.subplots(*shape, figsize=(2.6 * shape[1], 2.45 * shape[0] + 0.3),
                             squeeze=False)
    for p, (name, axis) in enumerate(PLANES):
        for m, (heading, labels) in enumerate(maps.items()):
            ax = axes[m, p] if planes_across else axes[p, m]
            cut = plane(image, axis, centre[axis])
            if labels is None:
                ax.imshow(cut, cmap="gray", origin="lower")
            else:
                ax.imshow(overlay(cut, plane(labels, axis, centre[axis]), colours),
                          origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
            top, left = (m == 0, p == 0) if planes_across else (p == 0, m == 0)
            if top:
                ax.set_title(name if planes_across else heading, fontsize=9)
            if left:
                ax.set_ylabel(heading if planes_across else name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
