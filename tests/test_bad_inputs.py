"""Broken input files through the real `ltnet` command line (issue 9).

Each broken file is refused with exit status 2 and a message naming it, with no traceback and
nothing written; the good files beside it (the controls) still go through. `segment` uses the
committed run results/demo_voxelmorph_1000 (atlas S13) on LPBA40 scans; `evaluate`, `train`
and `select-atlas` use a small SYNTHETIC data set (three 32^3 subjects).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import nibabel as nib
import numpy as np
import pytest
import yaml

from ltnet_keras import cli
from ltnet_keras.data.io import load_image, load_label_map, save_volume
from ltnet_keras.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
DEMO_RUN = REPO / "results" / "demo_voxelmorph_1000"
SUBJECTS = ["SYN01", "SYN02", "SYN03"]  # SYN01 is the atlas of the training runs


# ------------------------------------------------------------------------------ helpers

def run_cli(capsys, *argv):
    """``ltnet *argv`` in this process: ``(exit code, stdout, stderr)``."""
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code, err, command, *named):
    """Exit status 2, the one-line error of ``command`` naming every path of ``named``."""
    assert code == 2, err
    assert f"ltnet {command}: error: " in err, err
    for path in named:
        assert str(path) in err, err
    assert "Traceback" not in err, err


def rewrite(path, change, loader=load_image):
    """Replace the volume at ``path`` by ``change(array, affine) -> (array, affine)``."""
    volume = loader(path)
    array, affine = change(volume.array.copy(), volume.affine.copy())
    save_volume(array, path, affine)


def with_voxel(value):
    """A change that sets one voxel inside the brain (or label) to ``value``."""
    def change(array, affine):
        inside = np.argwhere(array > 0)
        array[tuple(inside[len(inside) // 2])] = value
        return array, affine
    return change


def shifted(mm):
    def change(array, affine):
        affine[0, 3] += mm
        return array, affine
    return change


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def not_an_image(path):
    path.write_text("this is not an image\n")


# Scans broken in ways every command that reads scans must refuse.
IMAGE_BREAKERS = {
    "nan_voxel": lambda p: rewrite(p, with_voxel(np.nan)),
    "all_zeros": lambda p: rewrite(p, lambda a, m: (np.zeros_like(a), m)),
    "truncated": truncate,
    "text_named_nii_gz": not_an_image,
    "4d": lambda p: rewrite(p, lambda a, m: (np.stack([a, a], axis=-1), m)),
}
# Label maps broken relative to their image, or to the label table.
LABEL_BREAKERS = {
    "other_grid": lambda p: rewrite(p, lambda a, m: (a[:, :, :-2], m), load_label_map),
    "shifted_7mm": lambda p: rewrite(p, shifted(7.0), load_label_map),
    "unknown_id_250": lambda p: rewrite(p, with_voxel(250), load_label_map),
    "unreadable": truncate,
}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", n_subjects=3,
                                   shape=(32, 32, 32))


@pytest.fixture
def data(synthetic_root, tmp_path):
    """A fresh copy of the synthetic data set, to break."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


def subprocess_cli(*argv):
    """``python -m ltnet_keras.cli *argv`` in a new process, this worktree's package first."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "ltnet_keras.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


# ------------------------------------------------------------------------------ evaluate

def evaluate_args(data, pred, out):
    return ["evaluate", "--pred", pred, "--truth", data / "labels", "--labels",
            data / "labels.tsv", "--out", out]


@pytest.mark.parametrize("case", ["shifted_7mm", "unknown_id_250", "other_grid", "empty"])
def test_evaluate_refuses_a_bad_prediction(case, data, tmp_path, capsys):
    pred = Path(shutil.copytree(data / "labels", tmp_path / "pred"))
    bad, truth = pred / "SYN02.nii.gz", data / "labels" / "SYN02.nii.gz"
    if case == "empty":
        rewrite(bad, lambda a, m: (np.zeros_like(a), m), load_label_map)
    else:
        LABEL_BREAKERS[case](bad)
    out = tmp_path / "scores.csv"
    # Ids outside the table are background by default; "error" is the strict mode.
    strict = ("--unknown-labels", "error") if case == "unknown_id_250" else ()
    code, printed, err = run_cli(capsys, *evaluate_args(data, pred, out), *strict)
    assert_refused(code, err, "evaluate", bad)
    assert printed == "" and not out.exists()
    if case in ("shifted_7mm", "other_grid"):
        assert str(truth) in err
    if case == "shifted_7mm":
        assert "7.00 mm apart" in err and "tolerance 0.10 mm" in err
    if case == "unknown_id_250":
        assert "[250]" in err and "--unknown-labels background" in err


def test_evaluate_scores_good_predictions(data, tmp_path, capsys):
    """Control: identical maps score 100 %, and an affine off by round-off is accepted."""
    pred = Path(shutil.copytree(data / "labels", tmp_path / "pred"))
    rewrite(pred / "SYN03.nii.gz", shifted(0.01), load_label_map)
    out = tmp_path / "scores.csv"
    code, printed, err = run_cli(capsys, *evaluate_args(data, pred, out))
    assert code == 0, err
    rows = out.read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == SUBJECTS
    assert all(float(row.split(",")[2]) == pytest.approx(1.0) for row in rows)
    assert "100.0" in printed


def test_evaluate_scores_unknown_labels_as_background_by_default(data, tmp_path, capsys):
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.evaluation import evaluate_pair
    pred = Path(shutil.copytree(data / "labels", tmp_path / "pred"))
    bad = pred / "SYN02.nii.gz"
    LABEL_BREAKERS["unknown_id_250"](bad)
    out = tmp_path / "scores.csv"
    code, _, err = run_cli(capsys, *evaluate_args(data, pred, out))
    assert code == 0, err
    assert str(bad) in err and "[250]" in err and "background" in err  # the warning
    assert err.count("[250]") == 1   # said once
    broken = load_label_map(bad).array
    as_background = np.where(broken == 250, 0, broken)
    expected = evaluate_pair(as_background, load_label_map(data / "labels" / "SYN02.nii.gz").array,
                             LabelTable.from_tsv(data / "labels.tsv")).mean_structure
    row = next(r for r in out.read_text().splitlines() if r.startswith("SYN02,"))
    assert expected < 1.0
    assert float(row.split(",")[2]) == pytest.approx(expected, abs=1e-6)


def test_evaluate_refusal_in_a_real_process_has_no_traceback(data, tmp_path):
    pred = Path(shutil.copytree(data / "labels", tmp_path / "pred"))
    LABEL_BREAKERS["shifted_7mm"](pred / "SYN01.nii.gz")
    out = tmp_path / "scores.csv"
    done = subprocess_cli(*evaluate_args(data, pred, out))
    assert_refused(done.returncode, done.stderr, "evaluate", pred / "SYN01.nii.gz",
                   data / "labels" / "SYN01.nii.gz")
    assert done.stdout == "" and not out.exists()


# ------------------------------------------------------------------------------ train, select-atlas

def train_args(data, tmp_path):
    config = {"preset": "voxelmorph",
              "data": {"root": str(data), "atlas": SUBJECTS[0], "train_subjects": SUBJECTS,
                       "val_subjects": SUBJECTS[-1:], "crop_shape": [32, 32, 32], "factor": 2},
              "network": {"enc_features": [4] * 4, "dec_features": [4] * 7},
              "train": {"steps": 1, "log_every": 1, "checkpoint_every": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["train", "--config", path, "--out", tmp_path / "run"]


def select_atlas_args(data, tmp_path):
    return ["select-atlas", "--data", data, "--subjects", *SUBJECTS, "--factor", "1"]


TRAINING_COMMANDS = {"train": train_args, "select-atlas": select_atlas_args}
# An id outside the label table is background, not an error (tests/test_protocols.py).
TRAINING_CASES = ([("images", case) for case in IMAGE_BREAKERS]
                  + [("labels", case) for case in LABEL_BREAKERS if case != "unknown_id_250"])


@pytest.mark.parametrize("folder, case", TRAINING_CASES)
@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_training_folder_with_a_bad_file_is_refused(command, folder, case, data, tmp_path,
                                                    capsys):
    """A pool subject's scan or label map (not the atlas'): refused before any work."""
    bad = data / folder / "SYN03.nii.gz"
    (IMAGE_BREAKERS if folder == "images" else LABEL_BREAKERS)[case](bad)
    code, printed, err = run_cli(capsys, *TRAINING_COMMANDS[command](data, tmp_path))
    assert_refused(code, err, command, bad)
    assert printed == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_good_training_folder_still_trains_and_selects(data, tmp_path, capsys):
    """Control: the unbroken folder trains one step and yields an atlas."""
    code, printed, err = run_cli(capsys, *select_atlas_args(data, tmp_path))
    assert code == 0, err
    assert printed.splitlines()[-1].split()[1] in SUBJECTS
    code, printed, err = run_cli(capsys, *train_args(data, tmp_path))
    assert code == 0, err
    assert "trained 1 steps" in printed
    assert (tmp_path / "run" / "forward_generator.h5").is_file()


# ------------------------------------------------------------------------------ segment

@pytest.fixture(scope="module")
def good_scan(lpba40_root):
    return lpba40_root / "images" / "S12.nii.gz"


def segment_args(images, out, *options):
    return ["segment", "--run", DEMO_RUN, "--image", *images, "--out", out, *options]


# For segment, on a copy of a real scan: too small for the atlas' field of view, and the rest.
SEGMENT_BREAKERS = dict(IMAGE_BREAKERS, too_small=lambda p: rewrite(
    p, lambda a, m: (a[60:80, 80:100, 60:80], m)))


@pytest.mark.parametrize("case", SEGMENT_BREAKERS)
def test_segment_refuses_a_bad_scan_before_writing_anything(case, good_scan, tmp_path, capsys):
    """The good scan comes first in the batch: it is not written either."""
    bad = Path(shutil.copy(good_scan, tmp_path / "bad.nii.gz"))
    SEGMENT_BREAKERS[case](bad)
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, *segment_args([good_scan, bad], out))
    assert_refused(code, err, "segment", bad)
    assert not out.exists() and printed == ""
    if case == "too_small":
        for described in ("shape (20, 20, 20)", "voxel size 1 x 1 x 1 mm",
                          "field of view 20.0 x 20.0 x 20.0 mm", "S13.nii.gz",
                          "shape (160, 192, 160)", "field of view 160.0 x 192.0 x 160.0 mm"):
            assert described in err


@pytest.mark.parametrize("case", SEGMENT_BREAKERS)
def test_segment_refuses_one_bad_scan_alone_before_writing_anything(case, good_scan, tmp_path,
                                                                    capsys):
    """One scan is not checked in a pass of its own: segmenting it refuses it just as early."""
    bad = Path(shutil.copy(good_scan, tmp_path / "bad.nii.gz"))
    SEGMENT_BREAKERS[case](bad)
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, *segment_args([bad], out, "--save-field",
                                                       "--save-warped-atlas"))
    assert_refused(code, err, "segment", bad)
    assert not out.exists() and printed == ""


@pytest.mark.slow
def test_segment_same_file_names_in_two_folders_get_distinct_outputs(good_scan, lpba40_root,
                                                                      lpba40_table, tmp_path,
                                                                      capsys):
    """Control as well: a good scan (as .mgz) gets a sensible label map on its own grid."""
    from ltnet_keras.evaluation import evaluate_pair
    scan = load_image(good_scan)
    # "scan.mgz", not "brainmask.mgz": a FreeSurfer name is named after its subject folder alone
    images = [save_volume(scan.array, tmp_path / folder / "scan.mgz", scan.affine)
              for folder in ("a", "b")]
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, *segment_args(images, out))
    assert code == 0, err
    # .mgz in, .mgz out (issue 8); the parent folder keeps the names apart (issue 9)
    assert sorted(p.name for p in out.iterdir()) == ["a_scan.mgz", "b_scan.mgz"]
    first, second = (load_label_map(out / name) for name in sorted(os.listdir(out)))
    np.testing.assert_array_equal(first.array, second.array)
    np.testing.assert_allclose(first.affine, scan.affine, atol=1e-5)
    truth = load_label_map(lpba40_root / "labels" / "S12.nii.gz").array
    # the run's validation subjects score 63-70 % (results/demo_voxelmorph_1000/results.md)
    assert evaluate_pair(first.array, truth, lpba40_table).mean_structure > 0.6


@pytest.mark.slow
def test_segment_never_overwrites_unless_asked(good_scan, tmp_path, capsys):
    out = tmp_path / "out"
    existing = out / "forward_field" / "S12.nii.gz"
    existing.parent.mkdir(parents=True)
    existing.write_text("an earlier result")
    code, printed, err = run_cli(capsys, *segment_args([good_scan], out, "--save-field"))
    assert_refused(code, err, "segment", existing)
    assert "--overwrite" in err
    assert existing.read_text() == "an earlier result" and not (out / "S12.nii.gz").exists()
    code, printed, err = run_cli(capsys, *segment_args([good_scan], out, "--save-field",
                                                       "--overwrite"))
    assert code == 0, err
    assert nib.load(str(existing)).shape == (160, 192, 160, 3)
    assert load_label_map(out / "S12.nii.gz").shape == (160, 192, 160)


@pytest.mark.parametrize("case", ["given_twice", "output_replaces_input"])
def test_segment_refuses_impossible_output_plans(case, good_scan, tmp_path, capsys):
    scan = Path(shutil.copy(good_scan, tmp_path / "S12.nii.gz"))
    images, out = ([scan, scan], tmp_path / "out") if case == "given_twice" else ([scan], tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, printed, err = run_cli(capsys, *segment_args(images, out, "--overwrite"))
    assert_refused(code, err, "segment", scan)
    assert sorted(tmp_path.rglob("*")) == before
    assert scan.read_bytes() == good_scan.read_bytes()


@pytest.mark.slow
def test_segment_refusal_in_a_real_process_has_no_traceback(good_scan, tmp_path):
    small = tmp_path / "small.nii.gz"
    SEGMENT_BREAKERS["too_small"](Path(shutil.copy(good_scan, small)))
    done = subprocess_cli(*segment_args([small], tmp_path / "out"))
    assert_refused(done.returncode, done.stderr, "segment", small)
    assert "too small" in done.stderr
    assert not (tmp_path / "out").exists()
