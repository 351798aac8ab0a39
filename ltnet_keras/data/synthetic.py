"""SYNTHETIC labelled "brains" for machines without real data (tests, demos, smoke runs).

Nothing here is MRI. Each subject is one template, an ellipsoidal "brain" holding pairs of
ellipsoidal structures that mirror each other across the left/right mid-plane (axis 0), each
structure with its own intensity, warped by a random smooth displacement field and given mild
noise. Labels ``2k - 1`` / ``2k`` are ``L_blobk`` / ``R_blobk``, merged as structure ``blobk``.
Everything is deterministic for a given seed.
"""
from pathlib import Path

import numpy as np
from scipy import ndimage

from ltnet_keras.data.io import save_volume
from ltnet_keras.data.labels import LabelTable

BRAIN_INTENSITY = 0.3
NOISE_STD = 0.02


def synthetic_label_table(n_pairs=4) -> LabelTable:
    """Ids ``1..2 * n_pairs``: odd ids ``L_blobk``, even ids ``R_blobk``, structure ``blobk``."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1; got {n_pairs}")
    ids, names, structures = [], [], []
    for k in range(1, n_pairs + 1):
        for side, label_id in (("L", 2 * k - 1), ("R", 2 * k)):
            ids.append(label_id)
            names.append(f"{side}_blob{k}")
            structures.append(f"blob{k}")
    return LabelTable(ids, names, structures)


def _template(shape, n_pairs):
    """Undeformed, noise-free image and label map, exactly mirror-symmetric along axis 0."""
    # Coordinates in units of the brain's semi-axes; axis 0 is centred on the mid-plane
    # (shape[0] - 1) / 2 so that flipping the array mirrors it exactly.
    centre = (np.asarray(shape) - 1) / 2.0
    semi_axes = 0.4 * np.asarray(shape)
    u = [(np.arange(n) - c) / a for n, c, a in zip(shape, centre, semi_axes)]
    x, y, z = np.meshgrid(*u, indexing="ij")
    brain = x ** 2 + y ** 2 + z ** 2 <= 1.0

    image = np.where(brain, BRAIN_INTENSITY, 0.0)
    labels = np.zeros(shape, dtype=np.int32)
    # Structures sit on a ring in the (y, z) plane on each side; the radius shrinks with their
    # number so that neighbours do not overlap.
    ring, offset = 0.45, 0.45
    radius = min(0.22, 0.7 * ring * np.sin(np.pi / n_pairs)) if n_pairs > 1 else 0.22
    intensities = np.linspace(0.55, 1.0, n_pairs)
    for k in range(n_pairs):
        angle = 2 * np.pi * k / n_pairs
        cy, cz = ring * np.cos(angle), ring * np.sin(angle)
        # Slightly elongated ellipsoids, different per structure, so the shapes are not all alike.
        ry, rz = radius * (1.0 + 0.3 * np.cos(angle)), radius * (1.0 - 0.2 * np.sin(angle))
        for side, label_id in ((-1, 2 * k + 1), (1, 2 * k + 2)):
            inside = (((x - side * offset) / radius) ** 2 + ((y - cy) / ry) ** 2
                      + ((z - cz) / rz) ** 2) <= 1.0
            image[inside] = intensities[k]
            labels[inside] = label_id
    return image, labels


def _smooth_displacement(shape, rng, max_displacement, smoothness):
    """Gaussian-smoothed white noise, rescaled so its largest vector is ``max_displacement``."""
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), smoothness,
                                              mode="reflect") for _ in range(3)])
    largest = np.sqrt((field ** 2).sum(axis=0)).max()
    return field * (max_displacement / largest)


def make_synthetic_subject(shape=(64, 64, 64), seed=0, n_pairs=4, max_displacement=3.0,
                           smoothness=None):
    """One SYNTHETIC subject: ``(image float32 in [0, 1], label map int32)``.

    Labels follow :func:`synthetic_label_table` ``(n_pairs)``. The template is warped by a smooth
    random field whose largest displacement is ``max_displacement`` voxels (0 keeps the exact
    left/right symmetric template); ``smoothness`` is the Gaussian sigma in voxels (default:
    an eighth of the smallest dimension). Noise (std 0.02) is added after warping.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8; got {shape}")
    synthetic_label_table(n_pairs)  # validates n_pairs
    rng = np.random.default_rng(seed)
    image, labels = _template(shape, n_pairs)
    if max_displacement > 0:
        sigma = smoothness if smoothness is not None else min(shape) / 8.0
        field = _smooth_displacement(shape, rng, max_displacement, sigma)
        coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")) + field
        image = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
        labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
    brain = image > 0
    image = image + brain * rng.normal(0.0, NOISE_STD, shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels.astype(np.int32)


def write_synthetic_dataset(root, n_subjects=4, shape=(64, 64, 64), seed=0, n_pairs=4,
                            max_displacement=3.0) -> Path:
    """Write a SYNTHETIC data set in the LPBA40 folder layout and return ``root``.

    ``root/images/SYNnn.nii.gz`` (float32), ``root/labels/SYNnn.nii.gz`` (uint8 when ids fit),
    ``root/labels.tsv`` and ``root/README.md`` (whose first line says the data are synthetic).
    Subject ``i`` uses the ``i``-th child of ``numpy.random.SeedSequence(seed)``.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    affine = np.eye(4)
    children = np.random.SeedSequence(seed).spawn(n_subjects)
    for number, child in enumerate(children, start=1):
        image, labels = make_synthetic_subject(shape, child, n_pairs, max_displacement)
        name = f"SYN{number:02d}.nii.gz"
        save_volume(image, root / "images" / name, affine)
        save_volume(labels, root / "labels" / name, affine)

    table = synthetic_label_table(n_pairs)
    rows = ["label\tname\tstructure"] + [f"{i}\t{n}\t{s}" for i, n, s in
                                         zip(table.ids.tolist(), table.names, table.structures)]
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    (root / "README.md").write_text(
        "# SYNTHETIC data: generated ellipsoid phantoms, NOT real brain MRI\n\n"
        f"Written by ltnet_keras.data.synthetic.write_synthetic_dataset(n_subjects={n_subjects}, "
        f"shape={tuple(shape)}, seed={seed}, n_pairs={n_pairs}, "
        f"max_displacement={max_displacement}).\n"
        "Each subject is one left/right symmetric template of ellipsoidal structures warped by a "
        "random smooth displacement field, with mild noise. Use only for tests and smoke runs; "
        "Dice on these data says nothing about performance on real scans.\n")
    return root
