"""Label tables: label ids <-> contiguous one-hot channels, and left/right structure merging.

A label map may hold ids its protocol leaves out (FreeSurfer's aseg has choroid plexus, vessels
and the corpus callosum beside the 28 protocol labels): those voxels are background, said once
per file (:meth:`LabelTable.restrict`).
"""
import csv
import warnings
from dataclasses import dataclass
from typing import Dict, List, Set

import numpy as np

from ltnet_keras.data.errors import VolumeError


# (file, ids) pairs already reported by LabelTable.restrict: a file read again (the atlas by
# every experiment row, an evaluation rerun) is not reported again in the same process.
_SAID: Set[tuple] = set()


@dataclass
class LabelTable:
    """Label ids of a segmentation protocol, their names and the merged structure of each.

    Channel 0 is background; channel ``k`` holds ``ids[k - 1]``. ``structures`` names the
    structure a label belongs to once left and right are combined (the paper's Table 4).
    """
    ids: np.ndarray
    names: List[str]
    structures: List[str]

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.ids.ndim != 1 or len(self.ids) == 0:
            raise ValueError("a label table needs at least one label id")
        if len(set(self.ids.tolist())) != len(self.ids):
            raise ValueError("label ids in a table must be unique")
        if 0 in self.ids:
            raise ValueError("label id 0 is background and cannot be in the table")
        if not len(self.names) == len(self.structures) == len(self.ids):
            raise ValueError("ids, names and structures must have the same length")
        self._lookup = np.full(int(self.ids.max()) + 1, -1, dtype=np.int32)
        self._lookup[0] = 0
        self._lookup[self.ids] = np.arange(1, len(self.ids) + 1, dtype=np.int32)

    @classmethod
    def from_tsv(cls, path) -> "LabelTable":
        """Read a tab-separated table with columns ``label``, ``name`` and optional ``structure``."""
        try:
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
        except OSError as error:
            raise VolumeError(path, f"cannot read label table ({error.strerror})") from error
        if not rows or "label" not in rows[0]:
            raise VolumeError(path, "label table needs a header with a 'label' column")
        try:
            ids = [int(row["label"]) for row in rows]
        except (TypeError, ValueError) as error:
            raise VolumeError(path, f"non-integer label id ({error})") from error
        names = [row.get("name") or str(i) for row, i in zip(rows, ids)]
        structures = [row.get("structure") or name for row, name in zip(rows, names)]
        try:
            return cls(ids, names, structures)
        except ValueError as error:
            raise VolumeError(path, str(error)) from error

    @classmethod
    def from_ids(cls, ids) -> "LabelTable":
        """A table with each id its own structure (for label maps without a protocol table)."""
        ids = [int(i) for i in ids if int(i) != 0]
        names = [str(i) for i in ids]
        return cls(ids, names, list(names))

    @property
    def n_channels(self) -> int:
        return len(self.ids) + 1

    def unknown_ids(self, label_map) -> List[int]:
        """Sorted ids of ``label_map`` that are neither background 0 nor in the table."""
        present = np.unique(np.asarray(label_map))
        return [int(v) for v in present
                if v < 0 or v >= len(self._lookup) or self._lookup[int(v)] < 0]

    def check_ids(self, label_map, source="", hint="") -> None:
        """Refuse a label map holding ids absent from the table (VolumeError naming ``source``
        and up to ten of the ids, then ``hint`` on what to do about it)."""
        unknown = self.unknown_ids(label_map)
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise VolumeError(source, f"label ids {unknown[:10]}{more} are not in the label "
                                      "table" + (f"; {hint}" if hint else ""))

    def restrict(self, label_map, source="") -> np.ndarray:
        """``label_map`` with the ids absent from the table set to background 0, said once per
        ``source`` (a warning naming the file, the ids and their voxel counts). A map holding
        no id of the table at all is refused (VolumeError): that is the wrong table, not a
        protocol that leaves some structures out."""
        label_map = np.asarray(label_map)
        unknown = self.unknown_ids(label_map)
        if not unknown:
            return label_map
        unknown_voxels = np.isin(label_map, unknown)
        if not np.any(label_map[~unknown_voxels]):
            self.check_ids(label_map, source, hint="none of the map's ids is in the table: is "
                                                   "it the label table of this protocol?")
        key = (str(source), tuple(unknown))
        if key not in _SAID:
            _SAID.add(key)
            more = f" and {len(unknown) - 12} more" if len(unknown) > 12 else ""
            warnings.warn(f"{source}: label ids {unknown[:12]}{more} are not in the label table: "
                          f"their {int(unknown_voxels.sum())} voxels are background", stacklevel=2)
        return np.where(unknown_voxels, 0, label_map).astype(label_map.dtype, copy=False)

    def to_channels(self, label_map, source="") -> np.ndarray:
        """Map label ids to channel indices; ids absent from the table are background
        (:meth:`restrict`)."""
        label_map = self.restrict(label_map, source)
        return self._lookup[label_map.astype(np.int64)]

    def to_ids(self, channel_map) -> np.ndarray:
        """Inverse of :meth:`to_channels`: channel indices back to label ids (0 = background)."""
        lut = np.concatenate([[0], self.ids]).astype(np.int32)
        return lut[np.asarray(channel_map, dtype=np.int64)]

    def one_hot(self, label_map, source="") -> np.ndarray:
        """``(..., n_channels)`` float32 one-hot encoding of a label map."""
        channels = self.to_channels(label_map, source)
        return np.eye(self.n_channels, dtype=np.float32)[channels]

    def structure_ids(self) -> Dict[str, List[int]]:
        """Merged structure -> its label ids, in table order."""
        merged: Dict[str, List[int]] = {}
        for label_id, structure in zip(self.ids.tolist(), self.structures):
            merged.setdefault(structure, []).append(label_id)
        return merged
