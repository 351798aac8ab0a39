import math

import nibabel as nib
import numpy as np
import pytest

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.evaluation import (SubjectScores, dice_per_label, dice_per_structure,
                                    evaluate_folders, evaluate_pair, format_structure_table,
                                    format_summary_table, read_scores_csv, summarise,
                                    write_scores_csv, write_summary_csv)

# Label 1: pred at (0,0),(0,1); truth at (0,0),(1,0) -> overlap 1.
# Label 2: pred at (0,2),(1,1),(1,2); truth at (0,2),(1,1) -> overlap 2.
PRED = np.array([[1, 1, 2], [0, 2, 2]])
TRUTH = np.array([[1, 0, 2], [1, 2, 0]])

# Structure "a" = labels 1 (left) and 2 (right), "b" = 3 and 4.
LR_TABLE = LabelTable([1, 2, 3, 4], ["L_a", "R_a", "L_b", "R_b"], ["a", "a", "b", "b"])
LR_PRED = np.array([[1, 1, 2, 2], [3, 0, 0, 4]])
LR_TRUTH = np.array([[1, 2, 2, 1], [3, 3, 0, 0]])


def test_dice_per_label_hand_values():
    dice = dice_per_label(PRED, TRUTH, [1, 2, 3])
    assert dice[1] == pytest.approx(2 * 1 / (2 + 2))
    assert dice[2] == pytest.approx(2 * 2 / (3 + 2))
    assert math.isnan(dice[3])  # in neither map


def test_dice_one_sided_label_is_zero_and_identical_maps_are_one():
    assert dice_per_label(PRED, np.zeros_like(PRED), [2])[2] == 0.0
    assert dice_per_label(TRUTH, TRUTH, [1, 2]) == {1: 1.0, 2: 1.0}


def test_dice_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice_per_label(PRED, TRUTH.T, [1])


def test_left_right_merging_differs_from_per_label():
    labels = dice_per_label(LR_PRED, LR_TRUTH, LR_TABLE.ids)
    assert labels[1] == pytest.approx(2 * 1 / (2 + 2))
    assert labels[2] == pytest.approx(2 * 1 / (2 + 2))
    assert labels[3] == pytest.approx(2 * 1 / (1 + 2))
    assert labels[4] == 0.0
    structures = dice_per_structure(LR_PRED, LR_TRUTH, LR_TABLE)
    assert list(structures) == ["a", "b"]
    assert structures["a"] == pytest.approx(2 * 4 / (4 + 4))  # left/right swaps count as overlap
    assert structures["b"] == pytest.approx(2 * 1 / (2 + 2))


def test_subject_means_ignore_nan():
    table = LabelTable([1, 2, 3], ["one", "two", "three"], ["one", "two", "three"])
    scores = evaluate_pair(PRED, TRUTH, table, subject="S01")
    assert scores.subject == "S01"
    assert math.isnan(scores.labels[3])
    assert scores.mean_label == pytest.approx((0.5 + 0.8) / 2)
    assert scores.mean_structure == pytest.approx((0.5 + 0.8) / 2)

    lr = evaluate_pair(LR_PRED, LR_TRUTH, LR_TABLE, subject="S02")
    assert lr.mean_structure == pytest.approx((1.0 + 0.5) / 2)
    assert lr.mean_label == pytest.approx((0.5 + 0.5 + 2 / 3 + 0.0) / 4)


def _fabricated():
    return [SubjectScores("A", {1: 0.4, 2: 0.6}, {"x": 0.5, "y": 0.7}),
            SubjectScores("B", {1: 0.9, 2: 0.9}, {"x": 0.7, "y": 0.7}),
            SubjectScores("C", {1: 0.5, 2: float("nan")}, {"x": 0.8, "y": 0.8})]


def test_summarise_structure_and_label_levels():
    summary = summarise(_fabricated())  # subject means 60, 70, 80 percent
    assert summary["mean"] == pytest.approx(70.0)
    assert summary["std"] == pytest.approx(math.sqrt((10 ** 2 + 0 + 10 ** 2) / 3))  # ddof=0
    assert (summary["min"], summary["max"], summary["n"]) == (pytest.approx(60.0),
                                                              pytest.approx(80.0), 3)
    by_label = summarise(_fabricated(), level="label")  # subject means 50, 90, 50
    assert by_label["mean"] == pytest.approx(190 / 3)
    assert by_label["max"] == pytest.approx(90.0)
    with pytest.raises(ValueError, match="structure, label"):
        summarise(_fabricated(), level="voxel")


def test_summary_table_shows_paper_format():
    text = format_summary_table({"no registration": summarise(_fabricated()),
                                 "LT-Net": {"mean": 82.34, "std": 1.26, "min": 79.0, "max": 84.96}})
    lines = text.splitlines()
    assert "Mean (std)" in lines[0] and "Min" in lines[0] and "Max" in lines[0]
    assert "70.0 (8.2)" in lines[1] and "60.0" in lines[1] and "80.0" in lines[1]
    assert lines[2].startswith("LT-Net") and "82.3 (1.3)" in lines[2] and "85.0" in lines[2]


def test_structure_table_has_a_row_per_structure():
    text = format_structure_table({"method": _fabricated()})
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert set(rows) == {"x", "y"}
    # x: 50, 70, 80 -> mean 66.7, population std 12.5
    assert "66.7 (12.5)" in rows["x"]


def test_scores_csv_round_trip(tmp_path):
    scores = _fabricated()
    path = tmp_path / "out" / "scores.csv"
    write_scores_csv(scores, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["subject", "mean_label", "mean_structure", "x", "y", "label_1", "label_2"]
    back = read_scores_csv(path)
    assert [s.subject for s in back] == ["A", "B", "C"]
    for original, read in zip(scores, back):
        assert read.structures == pytest.approx(original.structures, abs=1e-6)
        np.testing.assert_allclose(list(read.labels.values()), list(original.labels.values()),
                                   atol=1e-6)  # NaN compares equal here
        assert read.mean_label == pytest.approx(original.mean_label, abs=1e-6)
    assert [p.name for p in path.parent.iterdir()] == ["scores.csv"]  # no temp file left

    summary_path = tmp_path / "summary.csv"
    write_summary_csv({"m": summarise(scores)}, summary_path)
    lines = summary_path.read_text().splitlines()
    assert lines[0] == "method,level,n,mean,std,min,max"
    assert lines[1].startswith("m,structure,3,70.0000,8.1650,60.0000,80.0000")


def _write(path, array, affine=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.int16), affine), str(path))
    return path


def _volume(label_map):
    return np.asarray(label_map)[:, :, None].repeat(2, axis=2)


def test_evaluate_folders_matches_ids(tmp_path):
    _write(tmp_path / "pred" / "S01.nii.gz", _volume(LR_PRED))
    _write(tmp_path / "pred" / "S02.nii.gz", _volume(LR_TRUTH))
    _write(tmp_path / "truth" / "labels" / "S01.nii.gz", _volume(LR_TRUTH))
    _write(tmp_path / "truth" / "labels" / "S02.nii.gz", _volume(LR_TRUTH))
    scores = evaluate_folders(tmp_path / "pred", tmp_path / "truth", LR_TABLE)  # dataset root
    assert [s.subject for s in scores] == ["S01", "S02"]
    assert scores[0].structures["a"] == pytest.approx(1.0)
    assert scores[0].structures["b"] == pytest.approx(0.5)
    assert scores[1].mean_structure == pytest.approx(1.0)

    single = evaluate_folders(tmp_path / "pred" / "S01.nii.gz",
                              tmp_path / "truth" / "labels" / "S01.nii.gz", LR_TABLE)
    assert single[0].labels == pytest.approx(scores[0].labels)


def test_evaluate_folders_missing_and_unmatched(tmp_path):
    _write(tmp_path / "pred" / "S01.nii.gz", _volume(LR_PRED))
    _write(tmp_path / "truth" / "S01.nii.gz", _volume(LR_TRUTH))
    _write(tmp_path / "truth" / "S02.nii.gz", _volume(LR_TRUTH))
    with pytest.raises(VolumeError, match="S02"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth", LR_TABLE, strict=True)
    with pytest.warns(UserWarning, match="S02"):
        scores = evaluate_folders(tmp_path / "pred", tmp_path / "truth", LR_TABLE)
    assert [s.subject for s in scores] == ["S01"]

    _write(tmp_path / "other" / "S99.nii.gz", _volume(LR_PRED))
    with pytest.raises(VolumeError, match=r"S99.*S01.*S02"):
        evaluate_folders(tmp_path / "other", tmp_path / "truth", LR_TABLE)


def test_evaluate_folders_shape_mismatch_names_both_files(tmp_path):
    pred = _write(tmp_path / "pred" / "S01.nii.gz", _volume(LR_PRED))
    truth = _write(tmp_path / "truth" / "S01.nii.gz", _volume(LR_TRUTH)[:, :3])
    with pytest.raises(VolumeError) as caught:
        evaluate_folders(pred.parent, truth.parent, LR_TABLE)
    assert str(caught.value).startswith(str(pred)) and str(truth) in str(caught.value)


@pytest.mark.slow
def test_no_registration_dice_on_lpba40(lpba40_root, lpba40_table):
    from ltnet_keras.data.io import load_label_map
    atlas = load_label_map(lpba40_root / "labels" / "S01.nii.gz").array
    subject = load_label_map(lpba40_root / "labels" / "S11.nii.gz").array
    scores = evaluate_pair(atlas, subject, lpba40_table, "S11")
    print(f"\nno-registration Dice S01 -> S11: structures {scores.mean_structure:.4f}, "
          f"labels {scores.mean_label:.4f}")
    # labels.tsv: 27 left/right pairs plus unpaired cerebellum and brainstem = 29 structures.
    assert len(scores.structures) == len(lpba40_table.structure_ids()) == 29
    assert len(scores.labels) == 56
    assert 0.3 < scores.mean_label <= scores.mean_structure < 0.9
