"""Copies of a scan as a user would bring it: the head moved in the scanner (a small rotation,
shift and size change) and the volume stored as FreeSurfer stores it (256^3, 1 mm, LIA).

Used to check that ``ltnet segment --align affine`` undoes what it should (``experiments/
moved_scans.py``, the alignment tests). A move is a world (RAS mm) 4x4 matrix taking a point of
the original head to where it is in the moved scan.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ltnet_keras.data.align import resample_volume
from ltnet_keras.data.io import Volume

__all__ = ["HeadMove", "random_move", "conformed_grid", "move_volume"]

# FreeSurfer's conformed space: 256^3 voxels of 1 mm, axes pointing Left, Inferior, Anterior.
FREESURFER_SHAPE = (256, 256, 256)
_LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass
class HeadMove:
    """A similarity transform about ``centre``: rotate by ``degrees`` about ``axis``, scale,
    then shift by ``shift_mm``."""
    axis: Tuple[float, float, float]
    degrees: float
    shift_mm: Tuple[float, float, float]
    scale: float
    centre: Tuple[float, float, float]

    @property
    def matrix(self) -> np.ndarray:
        axis = np.asarray(self.axis, np.float64)
        axis = axis / np.linalg.norm(axis)
        angle = np.deg2rad(self.degrees)
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                          [-axis[1], axis[0], 0]])
        rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
        centre = np.asarray(self.centre, np.float64)
        out = np.eye(4)
        out[:3, :3] = self.scale * rotation
        out[:3, 3] = centre - out[:3, :3] @ centre + np.asarray(self.shift_mm, np.float64)
        return out

    def to_dict(self) -> dict:
        return {"axis": [float(v) for v in self.axis], "degrees": float(self.degrees),
                "shift_mm": [float(v) for v in self.shift_mm], "scale": float(self.scale),
                "centre": [float(v) for v in self.centre]}


def _world_centre(volume: Volume) -> np.ndarray:
    middle = (np.asarray(volume.shape, np.float64) - 1.0) / 2.0
    return (volume.affine @ np.append(middle, 1.0))[:3]


def random_move(rng: np.random.Generator, volume: Volume, max_degrees: float = 10.0,
                max_shift_mm: float = 10.0, scale_range=(0.95, 1.05)) -> HeadMove:
    """A rotation of at most ``max_degrees`` about a random axis through the volume's centre, a
    shift of at most ``max_shift_mm`` in a random direction and a size change in
    ``scale_range``."""
    def direction():
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)
    return HeadMove(axis=tuple(direction()), degrees=float(rng.uniform(0.0, max_degrees)),
                    shift_mm=tuple(direction() * rng.uniform(0.0, max_shift_mm)),
                    scale=float(rng.uniform(*scale_range)),
                    centre=tuple(_world_centre(volume)))


def conformed_grid(volume: Volume, shape=FREESURFER_SHAPE,
                   spacing: float = 1.0) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """FreeSurfer's conformed grid (1 mm, LIA) centred on ``volume``'s field of view; other
    ``shape`` / ``spacing`` give smaller LIA grids for tests."""
    affine = np.eye(4)
    affine[:3, :3] = _LIA * spacing
    middle = np.asarray(shape, np.float64) / 2.0      # FreeSurfer puts c_ras at voxel 128
    affine[:3, 3] = _world_centre(volume) - affine[:3, :3] @ middle
    return tuple(shape), affine


def move_volume(volume: Volume, move: np.ndarray, shape, affine, kind: str = "image") -> Volume:
    """``volume`` with its content moved by ``move`` (world 4x4), on the grid ``shape``,
    ``affine``: one interpolation (trilinear for images, nearest for labels)."""
    return resample_volume(volume, shape, affine, kind, world_transform=np.linalg.inv(move))
