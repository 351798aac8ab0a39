"""Each structure's volume in a label map (``ltnet segment --volumes``): voxel counts times
the voxel's volume from the header, per label name of the run's protocol."""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras.data.labels import LabelTable
from ltnet_keras.records import atomic_write_text, csv_text

TOTAL_COLUMN = "total"


def label_volumes(labels: np.ndarray, voxel_size: Sequence[float],
                  table: LabelTable) -> Dict[str, float]:
    """mm^3 per label *name* of ``table`` (voxel count x the voxel's volume), then
    :data:`TOTAL_COLUMN`: every labelled voxel of the table. Ids outside the table count
    nowhere."""
    voxel_mm3 = float(np.prod(np.asarray(voxel_size, np.float64)))
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64),
                         minlength=int(table.ids.max()) + 1)
    volumes = {name: float(counts[i]) * voxel_mm3 if i < counts.size else 0.0
               for i, name in zip(table.ids.tolist(), table.names)}
    volumes[TOTAL_COLUMN] = float(sum(volumes.values()))
    return volumes


def volume_columns(table: LabelTable) -> List[str]:
    return ["subject"] + list(table.names) + [TOTAL_COLUMN]


def write_volumes_csv(path, records: Sequence[dict], table: LabelTable) -> Path:
    """One row per record: ``subject``, mm^3 per label name, ``total``."""
    columns = volume_columns(table)
    rows = [[record["subject"]] + [f"{record['volumes'][c]:.1f}" for c in columns[1:]]
            for record in records]
    return atomic_write_text(path, csv_text(columns, rows))


def read_volumes_csv(path) -> Dict[str, Dict[str, float]]:
    """subject -> column -> mm^3, from :func:`write_volumes_csv`'s file."""
    import csv
    with open(path, newline="") as handle:
        return {row.pop("subject"): {k: float(v) for k, v in row.items()}
                for row in csv.DictReader(handle)}


def volume_errors(predicted: Dict[str, float], truth: Dict[str, float],
                  names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Relative absolute error |predicted - truth| / truth per label name (truth > 0)."""
    names = names or [n for n in truth if n != TOTAL_COLUMN]
    return {n: abs(predicted[n] - truth[n]) / truth[n] for n in names if truth[n] > 0}
