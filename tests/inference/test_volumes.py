"""Structure volumes (``--volumes``): voxel counts times the voxel volume of the header."""
import numpy as np
import pytest

from ltnet_keras.data.labels import LabelTable
from ltnet_keras.inference.volumes import (TOTAL_COLUMN, label_volumes, read_volumes_csv,
                                           volume_columns, volume_errors, write_volumes_csv)

TABLE = LabelTable([10, 11, 40], ["L_a", "R_a", "b"], ["a", "a", "b"])


def test_volumes_are_voxel_counts_times_the_anisotropic_voxel_volume():
    labels = np.zeros((5, 6, 7), np.int16)
    labels[0, :2, :3] = 10       # 6 voxels
    labels[1:3, 0, 0] = 11       # 2 voxels
    labels[4, 5, 6] = 99         # not in the table: counts nowhere
    voxel = (0.9, 1.2, 3.0)      # 3.24 mm^3
    volumes = label_volumes(labels, voxel, TABLE)
    assert list(volumes) == ["L_a", "R_a", "b", TOTAL_COLUMN]
    assert volumes["L_a"] == pytest.approx(6 * 3.24)
    assert volumes["R_a"] == pytest.approx(2 * 3.24)
    assert volumes["b"] == 0.0
    assert volumes[TOTAL_COLUMN] == pytest.approx(8 * 3.24)


def test_volume_table_round_trip_and_errors(tmp_path):
    records = [{"subject": "s1", "volumes": {"L_a": 100.0, "R_a": 50.0, "b": 0.0, "total": 150.0}},
               {"subject": "s2", "volumes": {"L_a": 80.0, "R_a": 55.0, "b": 1.0, "total": 136.0}}]
    path = write_volumes_csv(tmp_path / "v.csv", records, TABLE)
    assert path.read_text().splitlines()[0] == ",".join(volume_columns(TABLE))
    table = read_volumes_csv(path)
    assert list(table) == ["s1", "s2"] and table["s2"]["R_a"] == 55.0
    errors = volume_errors(table["s2"], table["s1"])
    assert errors == {"L_a": pytest.approx(0.2), "R_a": pytest.approx(0.1)}  # b: no truth
