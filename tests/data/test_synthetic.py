import numpy as np
import pytest

from ltnet_keras.data.io import find_subjects, load_subject
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.data.synthetic import (make_synthetic_subject, synthetic_label_table,
                                        write_synthetic_dataset)
from ltnet_keras.evaluation import evaluate_pair

SHAPE = (40, 40, 40)


def test_label_table_pairs_left_and_right():
    table = synthetic_label_table(3)
    assert table.ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert table.names[:2] == ["L_blob1", "R_blob1"]
    assert table.structure_ids() == {"blob1": [1, 2], "blob2": [3, 4], "blob3": [5, 6]}
    with pytest.raises(ValueError):
        synthetic_label_table(0)


def test_deterministic_under_seed():
    image1, labels1 = make_synthetic_subject(SHAPE, seed=3)
    image2, labels2 = make_synthetic_subject(SHAPE, seed=3)
    image3, labels3 = make_synthetic_subject(SHAPE, seed=4)
    np.testing.assert_array_equal(image1, image2)
    np.testing.assert_array_equal(labels1, labels2)
    assert not np.array_equal(labels1, labels3)


@pytest.mark.parametrize("n_pairs", [1, 4, 6])
def test_ids_match_table_and_values_in_range(n_pairs):
    image, labels = make_synthetic_subject(SHAPE, seed=0, n_pairs=n_pairs)
    table = synthetic_label_table(n_pairs)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert image.shape == labels.shape == SHAPE
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(labels).tolist()) == {0, *table.ids.tolist()}
    # Each structure is brighter than the surrounding tissue.
    tissue = image[(labels == 0) & (image > 0.1)].mean()
    assert all(image[labels == i].mean() > tissue + 0.15 for i in table.ids)


def test_template_is_mirror_symmetric_before_deformation():
    _, labels = make_synthetic_subject(SHAPE, seed=0, n_pairs=4, max_displacement=0)
    counts = np.bincount(labels.ravel(), minlength=9)
    np.testing.assert_array_equal(counts[1::2], counts[2::2])  # left volume == right volume
    assert counts[1:].min() > 50
    swapped = np.where(labels > 0, labels + np.where(labels % 2 == 1, 1, -1), 0)
    np.testing.assert_array_equal(np.flip(labels, axis=0), swapped)


def test_deformation_changes_labels_but_keeps_overlap():
    table = synthetic_label_table(4)
    _, template = make_synthetic_subject(SHAPE, seed=0, max_displacement=0)
    _, first = make_synthetic_subject(SHAPE, seed=1)
    _, second = make_synthetic_subject(SHAPE, seed=2)
    assert not np.array_equal(template, first)
    for a, b in ((template, first), (first, second)):
        dice = evaluate_pair(a, b, table).mean_label
        assert 0.3 < dice < 0.98


def test_write_dataset_layout(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn", n_subjects=3, shape=(24, 24, 24), seed=5,
                                   n_pairs=2)
    assert "SYNTHETIC" in (root / "README.md").read_text().splitlines()[0]
    table = LabelTable.from_tsv(root / "labels.tsv")
    assert table.ids.tolist() == [1, 2, 3, 4] and table.structures == ["blob1"] * 2 + ["blob2"] * 2
    subjects = find_subjects(root)
    assert list(subjects) == ["SYN01", "SYN02", "SYN03"]
    image, labels = load_subject(subjects["SYN02"].image, subjects["SYN02"].label, table)
    assert image.shape == (24, 24, 24) and labels.array.max() == 4

    again = write_synthetic_dataset(tmp_path / "again", n_subjects=3, shape=(24, 24, 24), seed=5,
                                    n_pairs=2)
    image_again, labels_again = load_subject(again / "images" / "SYN02.nii.gz",
                                             again / "labels" / "SYN02.nii.gz")
    np.testing.assert_array_equal(image.array, image_again.array)
    np.testing.assert_array_equal(labels.array, labels_again.array)
