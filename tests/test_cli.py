"""The `ltnet` command line: evaluate, select-atlas, prepare, and its error handling."""
import csv

import ltnet_keras  # noqa: F401

import nibabel as nib
import numpy as np
import pytest
import yaml

from ltnet_keras import cli


def write_labels(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.int16), np.eye(4)), str(path))
    return path


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def toy(tmp_path):
    """Label table with ids 1 (structure a) and 2 (structure b), a truth and a prediction.

    truth: label 1 fills x in [0, 2) (32 voxels), label 2 fills x in [2, 4), y in [0, 2) (16).
    pred:  label 1 fills only x = 0 (16 voxels) -> Dice 2*16/(16+32) = 2/3; label 2 identical.
    """
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("label\tname\tstructure\n1\tL_a\ta\n2\tR_b\tb\n")
    truth = np.zeros((4, 4, 4), np.int16)
    truth[0:2] = 1
    truth[2:4, 0:2] = 2
    pred = truth.copy()
    pred[1] = 0
    return tsv, truth, pred


def test_evaluate_prints_the_dice_and_writes_a_csv(toy, tmp_path, capsys):
    tsv, truth, pred = toy
    write_labels(tmp_path / "truth" / "s1.nii.gz", truth)
    write_labels(tmp_path / "pred" / "s1.nii.gz", pred)
    out = tmp_path / "scores.csv"
    code = cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth",
                     str(tmp_path / "truth"), "--labels", str(tsv), "--out", str(out),
                     "--name", "toy", "--per-structure"])
    printed = capsys.readouterr().out
    assert code == 0
    # mean over structures (2/3 + 1) / 2 = 83.3 %
    line = next(l for l in printed.splitlines() if l.startswith("toy"))
    assert line.split()[1:] == ["83.3", "(0.0)", "83.3", "83.3"], printed
    assert "66.7" in printed and "100.0" in printed  # per-structure table
    rows = read_csv(out)
    assert [r["subject"] for r in rows] == ["s1"]
    assert float(rows[0]["label_1"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(rows[0]["label_2"]) == pytest.approx(1.0)
    assert float(rows[0]["mean_structure"]) == pytest.approx(5 / 6, abs=1e-6)


def test_evaluate_label_level(toy, tmp_path, capsys):
    tsv, truth, pred = toy
    truth_path = write_labels(tmp_path / "t.nii.gz", truth)
    pred_path = write_labels(tmp_path / "p.nii.gz", pred)
    tsv.write_text("label\tname\tstructure\n1\tL_a\ta\n2\tR_a\ta\n")  # one merged structure
    assert cli.main(["evaluate", "--pred", str(pred_path), "--truth", str(truth_path),
                     "--labels", str(tsv), "--level", "label"]) == 0
    assert "83.3" in capsys.readouterr().out
    assert cli.main(["evaluate", "--pred", str(pred_path), "--truth", str(truth_path),
                     "--labels", str(tsv)]) == 0
    # merged: pred 32 voxels, truth 48, overlap 32 -> 2*32/80 = 80 %
    assert "80.0" in capsys.readouterr().out


def test_evaluate_one_prediction_against_every_other_subject(toy, tmp_path, capsys):
    tsv, truth, pred = toy
    for subject in ("s1", "s2", "s3"):
        write_labels(tmp_path / "truth" / f"{subject}.nii.gz", truth)
    atlas = write_labels(tmp_path / "atlas" / "s1.nii.gz", pred)
    out = tmp_path / "scores.csv"
    code = cli.main(["evaluate", "--pred", str(atlas), "--truth", str(tmp_path / "truth"),
                     "--labels", str(tsv), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = read_csv(out)
    assert sorted(r["subject"] for r in rows) == ["s2", "s3"]  # its own subject left out
    assert all(float(r["mean_structure"]) == pytest.approx(5 / 6, abs=1e-6) for r in rows)


def test_evaluate_missing_file_is_exit_code_2(toy, tmp_path, capsys):
    tsv, truth, _ = toy
    write_labels(tmp_path / "truth" / "s1.nii.gz", truth)
    missing = tmp_path / "nowhere" / "s1.nii.gz"
    code = cli.main(["evaluate", "--pred", str(missing), "--truth", str(tmp_path / "truth"),
                     "--labels", str(tsv)])
    captured = capsys.readouterr()
    assert code == 2
    assert str(missing) in captured.err
    assert "ltnet evaluate: error" in captured.err
    assert "Traceback" not in captured.err


def test_evaluate_missing_label_table_is_exit_code_2(toy, tmp_path, capsys):
    _, truth, pred = toy
    write_labels(tmp_path / "t.nii.gz", truth)
    write_labels(tmp_path / "p.nii.gz", pred)
    table = tmp_path / "no_table.tsv"
    code = cli.main(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--truth",
                     str(tmp_path / "t.nii.gz"), "--labels", str(table)])
    assert code == 2
    assert str(table) in capsys.readouterr().err


def test_select_atlas_on_real_subjects(lpba40_root, capsys):
    code = cli.main(["select-atlas", "--data", str(lpba40_root), "--subjects", "S11", "S12",
                     "S13", "--factor", "4"])
    out = capsys.readouterr().out
    assert code == 0
    chosen = [l for l in out.splitlines() if l.startswith("atlas:")]
    assert len(chosen) == 1, out
    assert chosen[0].split()[1] in {"S11", "S12", "S13"}
    scores = [l.split("\t") for l in out.splitlines() if "\t" in l]
    assert sorted(s for s, _ in scores) == ["S11", "S12", "S13"]
    assert scores[0][0] == chosen[0].split()[1]  # best first


def test_select_atlas_unknown_subject_is_exit_code_2(lpba40_root, capsys):
    code = cli.main(["select-atlas", "--data", str(lpba40_root), "--subjects", "S11", "S99"])
    assert code == 2
    assert "S99" in capsys.readouterr().err


def test_prepare_writes_network_grid_npz(lpba40_root, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"crop_shape": [128, 192, 128], "factor": 4}}))
    out = tmp_path / "prepared"
    code = cli.main(["prepare", "--config", str(config), "--data", str(lpba40_root),
                     "--subjects", "S11", "S12", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for subject in ("S11", "S12"):
        with np.load(out / f"{subject}.npz") as archive:
            assert archive["vol"].shape == (32, 48, 32)
            assert archive["seg"].shape == (32, 48, 32)
            assert archive["vol"].dtype == np.float32
            assert 0.0 <= archive["vol"].min() and archive["vol"].max() <= 1.0
            assert np.issubdtype(archive["seg"].dtype, np.integer)
            assert len(np.unique(archive["seg"])) > 20
            assert archive["affine"].shape == (4, 4)
    assert "(32, 48, 32)" in capsys.readouterr().out


def test_prepare_missing_data_root_is_exit_code_2(tmp_path, capsys):
    root = tmp_path / "no_data"
    code = cli.main(["prepare", "--data", str(root), "--subjects", "S11", "--out",
                     str(tmp_path / "out")])
    assert code == 2
    assert str(root) in capsys.readouterr().err


def test_train_with_a_bad_config_is_exit_code_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stepz: 3\n")
    code = cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "stepz" in err and "steps" in err
    assert not (tmp_path / "run").exists()


def test_unknown_preset_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["train", "--preset", "cyclegan", "--out", str(tmp_path / "run")])
    assert error.value.code == 2
    assert "ltnet" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_from_a_fresh_shell_prints_no_tensorflow_log(lpba40_root, tmp_path):
    """`ltnet segment` with no TF_CPP_MIN_LOG_LEVEL in the environment: the user sees the
    result line, not TensorFlow's C++ start-up log (oneDNN notice, CUDA probe, absl lines)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    run = Path(__file__).resolve().parents[1] / "results" / "recipe" / "voxelmorph"
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "LTNET_TF_LOG")}
    done = subprocess.run([sys.executable, "-m", "ltnet_keras.cli", "segment", "--run", str(run),
                           "--align", "none", "--image", str(lpba40_root / "images" / "S31.nii.gz"),
                           "--out", str(tmp_path / "seg")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = (done.stdout + done.stderr).splitlines()
    noise = [line for line in printed if re.match(r"^[IWE]\d{4} ", line)
             or re.search(r"oneDNN|cuInit|cuda|absl::InitializeLog", line)]
    assert noise == [], noise
    assert any("S31.nii.gz ->" in line for line in printed), printed
    # The process ends without Python's teardown (cli.run): the label map is whole...
    from ltnet_keras.data.io import load_label_map
    assert load_label_map(tmp_path / "seg" / "S31.nii.gz").array.shape == (160, 192, 160)
    # ... and a failure's status and message still come out.
    failed = subprocess.run([sys.executable, "-m", "ltnet_keras.cli", "segment", "--run",
                             str(run), "--align", "none", "--image", str(tmp_path / "no.nii.gz"),
                             "--out", str(tmp_path / "seg2")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 2 and "no.nii.gz" in failed.stderr, failed.stderr


_PARENT_OF_WORKERS = """
import sys
import ltnet_keras.inference.parallel as parallel
from ltnet_keras import cli
parallel.segment_batch_in_workers = lambda *args, **kwargs: print(
    "tensorflow in the parent:", "tensorflow" in sys.modules)
cli.main(sys.argv[1:])
"""


def test_segment_with_workers_leaves_tensorflow_to_them(lpba40_root, tmp_path):
    """``--jobs 2``: the parent hands out scans and does not start TensorFlow itself (its ~3 s
    would come before the workers' own start)."""
    import subprocess
    import sys
    from pathlib import Path
    run = Path(__file__).resolve().parents[1] / "results" / "recipe" / "voxelmorph"
    images = [str(lpba40_root / "images" / f"{s}.nii.gz") for s in ("S31", "S32")]
    done = subprocess.run([sys.executable, "-c", _PARENT_OF_WORKERS, "segment", "--run",
                           str(run), "--align", "none", "--jobs", "2", "--out",
                           str(tmp_path / "seg"), "--image", *images],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tensorflow in the parent: False" in done.stdout, done.stdout + done.stderr


def _segment_args(*extra):
    return cli.build_parser().parse_args(["segment", "--run", "r", "--image", "a.nii.gz",
                                          "--out", "o", *extra])


def test_refine_options_build_the_settings():
    assert cli.refine_settings(_segment_args()) is None
    settings = cli.refine_settings(_segment_args("--refine", "--refine-levels", "8:30,2:15",
                                                 "--refine-lr", "0.2", "--refine-diffeomorphic"))
    assert settings.levels == ((8, 30), (2, 15))
    assert settings.learning_rate == 0.2 and settings.diffeomorphic is True
    from ltnet_keras.inference.refine import RefineSettings
    defaults = cli.refine_settings(_segment_args("--refine"))
    assert defaults == RefineSettings()
    ltnet = cli.refine_settings(_segment_args("--refine", "--refine-start", "zero",
                                              "--refine-objective", "ltnet"))
    assert (ltnet.start, ltnet.objective) == ("zero", "ltnet")


@pytest.mark.parametrize("extra,message", [
    (["--refine-lr", "0.2"], "--refine-lr: these options need --refine"),
    (["--refine-objective", "ltnet"], "--refine-objective: these options need --refine"),
    (["--refine", "--refine-levels", "4-60"], "FACTOR:STEPS pairs"),
    (["--refine", "--refine-levels", "3:20"], "valid: 1, 2, 4, 8"),
    (["--refine", "--refine-levels", "2:20,4:20"], "coarse to fine"),
    (["--refine", "--refine-lr", "-1"], "learning_rate must be > 0"),
])
def test_bad_refine_options_are_refused_with_the_valid_ones(extra, message):
    with pytest.raises(ValueError, match=message):
        cli.refine_settings(_segment_args(*extra))


@pytest.mark.slow
def test_segment_with_refine_splits_the_seconds_and_writes_labels(lpba40_root, tmp_path,
                                                                   capsys):
    from pathlib import Path
    run = Path(__file__).resolve().parents[1] / "results" / "recipe" / "voxelmorph"
    code = cli.main(["segment", "--run", str(run), "--align", "none", "--image",
                     str(lpba40_root / "images" / "S31.nii.gz"), "--out", str(tmp_path),
                     "--refine", "--refine-levels", "4:10,2:5"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    line = next(line for line in printed.out.splitlines() if "S31.nii.gz ->" in line)
    for stage in ("network", "refine", "warp", "write"):
        assert f"{stage} " in line, line
    assert "refined field folds" in line
    assert (tmp_path / "S31.nii.gz").exists()
