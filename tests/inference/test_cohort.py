"""`ltnet segment --image-list FILE --shard I/N`: cohorts split over a job array (issue 20).

The end-to-end tests use an untrained run on SYNTHETIC 32^3 phantoms (network grid 16^3, 4
channels): cheap, and what is tested (which scans each task takes, the names, the bytes,
skipping and failures) does not depend on how good the labels are.
"""
import shutil
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import pytest

from ltnet_keras import cli
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.inference.cohort import Shard, parse_shard, read_image_list


def run_cli(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_list(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ the list

def test_image_list_skips_blanks_and_comments_and_resolves_relative_paths(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a.nii.gz", "b.mgz"):
        (scans / name).write_bytes(b"")
    listed = write_list(tmp_path / "lists" / "cohort.txt",
                        ["# site 1", "", "../scans/a.nii.gz", "   ", f"  {scans / 'b.mgz'}  "])
    assert read_image_list(listed) == [tmp_path / "lists" / ".." / "scans" / "a.nii.gz",
                                       scans / "b.mgz"]


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "no_list"])
def test_bad_image_list_names_the_list_and_line(tmp_path, case):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    bad = {"missing": "nope.nii.gz", "folder": "sub"}.get(case)
    listed = tmp_path / "cohort.txt"
    if case != "no_list":
        write_list(listed, ["# header", "" if case == "empty" else "a.nii.gz"]
                   + ([bad] if bad else []))
    with pytest.raises(VolumeError) as error:
        read_image_list(listed)
    message = str(error.value)
    assert message.startswith(str(listed))
    expected = {"missing": f"line 3: nope.nii.gz: no such file ({tmp_path / 'nope.nii.gz'})",
                "folder": "line 3: sub: is a folder, not a file",
                "empty": "names no scans", "no_list": "image list not found"}[case]
    assert expected in message, message


@pytest.mark.parametrize("text, problem", [
    ("3/3", "I must be 0 ... 2"), ("1/0", "N must be at least 1"), ("-1/3", "expected I/N"),
    ("1", "expected I/N"), ("a/b", "expected I/N")])
def test_bad_shard_is_refused_with_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_shard(text)


def test_shards_cover_the_list_once():
    items = list(range(11))
    for count in (1, 2, 3, 4, 11, 13):
        taken = [Shard(index, count).take(items) for index in range(count)]
        assert sorted(sum(taken, [])) == items
        assert max(map(len, taken)) - min(map(len, taken)) <= 1
    assert parse_shard(" 2/5 ") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """An untrained synthetic run (train.steps 0: G_F's initial weights, saved as a finished
    run saves them) and a list of 5 scans, two of them named alike in two folders
    (a/scan, b/scan): their output names depend on the whole list, not on one shard."""
    from ltnet_keras.config import config_from_dict
    from ltnet_keras.data.synthetic import write_synthetic_dataset
    from ltnet_keras.training import train
    root = tmp_path_factory.mktemp("cohort")
    data = write_synthetic_dataset(root / "data", n_subjects=6, shape=(32, 32, 32))
    config = config_from_dict({
        "preset": "voxelmorph",
        "data": {"root": str(data), "atlas": "SYN01", "train_subjects": ["SYN01", "SYN02"],
                 "val_subjects": [], "crop_shape": [32, 32, 32], "factor": 2},
        "network": {"enc_features": [4] * 4, "dec_features": [4] * 7},
        "train": {"steps": 0}})
    train(config, root / "run", verbose=0)
    images = data / "images"
    for folder, subject in (("a", "SYN03"), ("b", "SYN06")):
        (root / folder).mkdir()
        shutil.copy(images / f"{subject}.nii.gz", root / folder / "scan.nii.gz")
    listed = write_list(root / "lists" / "cohort.txt", [
        "# five scans", "../data/images/SYN02.nii.gz", str(root / "a" / "scan.nii.gz"), "",
        "../b/scan.nii.gz", "../data/images/SYN04.nii.gz", "../data/images/SYN05.nii.gz"])
    return root / "run", listed


def segment_args(cohort, out, *options):
    run, listed = cohort
    return ["segment", "--run", run, "--image-list", listed, "--out", out, "--align", "none",
            "--save-field", *options]


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_three_shards_write_the_files_of_one_unsharded_run_bit_for_bit(cohort, tmp_path,
                                                                       capsys):
    whole = tmp_path / "whole"
    code, printed, err = run_cli(capsys, *segment_args(cohort, whole))
    assert code == 0, err
    assert printed.splitlines()[-1] == ("5 scans: 5 segmented, 0 skipped (output exists; "
                                        "--overwrite to redo), 0 failed")
    expected = files_of(whole)
    assert sorted(expected) == sorted(
        [f"{name}.nii.gz" for name in ("SYN02", "a_scan", "b_scan", "SYN04", "SYN05")]
        + [f"forward_field/{name}.nii.gz" for name in ("SYN02", "a_scan", "b_scan", "SYN04",
                                                       "SYN05")])

    sharded = tmp_path / "sharded"
    taken = {}
    for index in range(3):
        code, printed, err = run_cli(capsys, *segment_args(cohort, sharded, "--shard",
                                                           f"{index}/3"))
        assert code == 0, err
        taken[index] = [line.split(" -> ")[1].split(" (")[0] for line in printed.splitlines()
                        if " -> " in line]
        assert printed.splitlines()[-1].startswith(f"shard {index}/3: {len(taken[index])} "
                                                   f"scans: {len(taken[index])} segmented")
    # every third listed scan from the I-th (reported as they finish: two workers each)
    assert [sorted(Path(p).name for p in taken[i]) for i in range(3)] == [
        ["SYN02.nii.gz", "SYN04.nii.gz"], ["SYN05.nii.gz", "a_scan.nii.gz"], ["b_scan.nii.gz"]]
    assert files_of(sharded) == expected  # same names, same bytes, nothing else

    # A re-submitted task resumes: its scans are done, so it skips them and writes nothing.
    code, printed, err = run_cli(capsys, *segment_args(cohort, sharded, "--shard", "1/3"))
    assert code == 0, err
    assert printed.splitlines() == ["shard 1/3: 2 scans: 0 segmented, 2 skipped (output "
                                    "exists; --overwrite to redo), 0 failed"]
    assert files_of(sharded) == expected


@pytest.mark.slow
def test_a_bad_scan_is_reported_and_the_rest_of_the_cohort_goes_on(cohort, tmp_path, capsys):
    run, listed = cohort
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    good = (listed.parent / "../data/images/SYN02.nii.gz").resolve()
    cohort_list = write_list(tmp_path / "cohort.txt", [str(bad), str(good)])
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, *segment_args((run, cohort_list), out))
    assert code == 1
    assert printed.splitlines()[-1] == ("2 scans: 1 segmented, 0 skipped (output exists; "
                                        "--overwrite to redo), 1 failed")
    assert f"ltnet segment: failed: {bad}: " in err
    assert (out / "SYN02.nii.gz").is_file() and not (out / "bad.nii.gz").exists()
    assert not [p for p in out.rglob(".*")]  # no temporary file left behind

    # A label map without the field asked for now (as an earlier run without --save-field
    # leaves): an error for that scan, and its label map is not silently redone.
    (out / "forward_field" / "SYN02.nii.gz").unlink()
    labels = (out / "SYN02.nii.gz").read_bytes()
    code, printed, err = run_cli(capsys, *segment_args((run, cohort_list), out))
    assert code == 1
    assert "SYN02.nii.gz exists but not" in err and "--overwrite" in err
    assert not (out / "forward_field" / "SYN02.nii.gz").exists()
    assert (out / "SYN02.nii.gz").read_bytes() == labels


@pytest.mark.parametrize("extra, message", [
    (["--shard", "1/3"], "--shard needs --image-list"),
])
def test_shard_without_a_list_is_refused(tmp_path, capsys, extra, message):
    code, printed, err = run_cli(capsys, "segment", "--run", tmp_path, "--image",
                                 tmp_path / "a.nii.gz", "--out", tmp_path / "out", *extra)
    assert code == 2 and message in err


def test_a_scan_listed_twice_is_refused_before_any_work(tmp_path, capsys):
    scan = tmp_path / "S1.nii.gz"
    scan.write_bytes(b"")
    listed = write_list(tmp_path / "cohort.txt", ["S1.nii.gz", str(scan)])
    # The run folder does not exist: the list is refused before the run is even looked at.
    code, printed, err = run_cli(capsys, "segment", "--run", tmp_path / "no_run", "--image-list",
                                 listed, "--out", tmp_path / "out", "--shard", "0/2")
    assert code == 2
    assert f"ltnet segment: error: {scan}: this scan is given more than once" in err
    assert not (tmp_path / "out").exists()


def test_bad_shard_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["segment", "--run", str(tmp_path), "--image-list", str(tmp_path / "l.txt"),
                  "--out", str(tmp_path / "out"), "--shard", "3/3"])
    assert error.value.code == 2
    assert "--shard '3/3': I must be 0 ... 2" in capsys.readouterr().err


@pytest.mark.slow
def test_shards_volumes_qc_and_report_hold_every_scan_once_in_list_order(cohort, tmp_path,
                                                                         capsys):
    import csv
    from html.parser import HTMLParser

    from ltnet_keras.data.io import load_label_map
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.qc import QCModel
    run, listed = cohort
    table = LabelTable.from_tsv(Path(run).parent / "data" / "labels.tsv")
    structures = list(dict.fromkeys(table.structures))
    model = QCModel(["ncc_mean"], [0.1, 0.8], {s: [0.2, 0.5] for s in structures}, 0.5)
    model_path = model.save(tmp_path / "qc_model.json")
    out, report = tmp_path / "out", tmp_path / "report"
    options = ["--volumes", tmp_path / "volumes.csv", "--qc", tmp_path / "qc.csv",
               "--qc-model", model_path, "--report", report]
    names = ["SYN02", "a_scan", "b_scan", "SYN04", "SYN05"]
    for index in (1, 0):   # the last task to finish writes every row, whichever it is
        code, printed, err = run_cli(capsys, *segment_args(cohort, out, "--shard",
                                                           f"{index}/2", *options))
        assert code == 0, err
    with open(tmp_path / "volumes.csv") as handle:
        volumes = list(csv.DictReader(handle))
    assert [row["subject"] for row in volumes] == names
    assert list(volumes[0]) == ["subject"] + list(table.names) + ["total"]
    labels = load_label_map(out / "SYN04.nii.gz")
    voxel = float(abs(__import__("numpy").linalg.det(labels.affine[:3, :3])))
    assert float(volumes[3]["total"]) == pytest.approx((labels.array > 0).sum() * voxel, abs=0.1)
    with open(tmp_path / "qc.csv") as handle:
        qc = list(csv.DictReader(handle))
    assert sorted(row["subject"] for row in qc) == sorted(names)
    header = list(qc[0])
    assert header[:2] == ["subject", "predicted_dice"] and "flag" in header
    assert [f"predicted_dice_{s}" for s in structures] == header[2:2 + len(structures)]
    for row in qc:
        assert 0 <= float(row["predicted_dice"]) <= 1 and row["flag"] in ("ok", "check")
        assert float(row["predicted_dice"]) == pytest.approx(
            min(max(0.1 + 0.8 * float(row["ncc_mean"]), 0), 1), abs=1e-3)

    class Images(HTMLParser):
        found = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.found.append(dict(attrs)["src"])
    parser = Images()
    parser.feed((report / "index.html").read_text())
    assert sorted(Path(src).stem for src in parser.found) == sorted(names)
    assert all((report / src).is_file() for src in parser.found)
    # A resubmitted task segments nothing and leaves the same complete table.
    before = (tmp_path / "volumes.csv").read_text()
    code, printed, err = run_cli(capsys, *segment_args(cohort, out, "--shard", "0/2", *options))
    assert code == 0 and (tmp_path / "volumes.csv").read_text() == before


# ------------------------------------------------------------------------------ --jobs

def without_seconds(files: dict) -> dict:
    """The files, each record without its timings (the one thing two runs never share)."""
    import json
    return {name: (json.dumps({k: v for k, v in json.loads(data).items() if k != "seconds"})
                   if name.startswith("records/") else data) for name, data in files.items()}


@pytest.mark.slow
def test_two_jobs_write_the_files_of_one_process_bit_for_bit_and_a_bad_scan_fails_alone(
        cohort, tmp_path, capsys):
    run, listed = cohort
    images = (listed.parent / "../data/images").resolve()
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    scans = write_list(tmp_path / "cohort.txt", [str(images / "SYN02.nii.gz"), str(bad),
                                                 str(images / "SYN04.nii.gz"),
                                                 str(images / "SYN05.nii.gz")])
    outputs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        code, printed, err = run_cli(capsys, *segment_args(
            (run, scans), out, "--jobs", jobs, "--volumes", out / "volumes.csv",
            "--report", out / "report"))
        assert code == 1, err
        lines = printed.splitlines()
        assert "4 scans: 3 segmented, 0 skipped (output exists; --overwrite to redo), " \
               "1 failed" in lines, printed
        assert sorted(Path(line.split(" -> ")[1].split(" (")[0]).name for line in lines
                      if " -> " in line) == ["SYN02.nii.gz", "SYN04.nii.gz", "SYN05.nii.gz"]
        assert err.count("ltnet segment: failed: ") == 1 and f"failed: {bad}: " in err
        assert not [p for p in out.rglob(".*")]   # no temporary file left behind
        outputs[jobs] = files_of(out)
    assert "SYN05.nii.gz" in outputs["2"] and "records/SYN05.json" in outputs["2"]
    assert "volumes.csv" in outputs["2"] and "report/index.html" in outputs["2"]
    assert not any("bad" in name for name in outputs["2"])
    assert without_seconds(outputs["2"]) == without_seconds(outputs["1"])

    # Rerun: every good scan is done, so no worker starts; the bad one fails again.
    code, printed, err = run_cli(capsys, *segment_args((run, scans), tmp_path / "jobs2",
                                                       "--jobs", "auto"))
    assert code == 1 and printed.splitlines()[-1] == (
        "4 scans: 0 segmented, 3 skipped (output exists; --overwrite to redo), 1 failed")


@pytest.mark.parametrize("value, problem", [
    ("0", "at least 1 process"), ("-2", "at least 1 process"),
    ("two", "expected a whole number of processes"), ("1.5", "expected a whole number")])
def test_bad_jobs_is_a_usage_error(tmp_path, capsys, value, problem):
    with pytest.raises(SystemExit) as error:
        cli.main(["segment", "--run", str(tmp_path), "--image-list", str(tmp_path / "l.txt"),
                  "--out", str(tmp_path / "out"), "--jobs", value])
    assert error.value.code == 2
    assert f"--jobs {value!r}: {problem}" in capsys.readouterr().err


def test_auto_jobs_is_the_usable_cores_capped_by_the_scans_and_the_memory(monkeypatch):
    from ltnet_keras.inference import parallel
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 3, 5})
    monkeypatch.setattr(parallel, "available_memory_gib", lambda: 100.0)
    assert parallel.parse_jobs(" AUTO ") == "auto" and parallel.parse_jobs("4") == 4
    assert [parallel.resolve_jobs("auto", n) for n in (1, 2, 3, 9)] == [1, 2, 3, 3]
    assert parallel.resolve_jobs(4, 2) == 2 and parallel.resolve_jobs(1, 9) == 1
    # 64 cores, 64 GiB free: as many workers as fit at 3 GiB each; too little memory: one
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(parallel, "available_memory_gib", lambda: 64.0)
    assert parallel.resolve_jobs("auto", 500) == 21
    assert parallel.resolve_jobs(40, 500) == 40            # a number given is taken as it is
    monkeypatch.setattr(parallel, "available_memory_gib", lambda: 2.0)
    assert parallel.resolve_jobs("auto", 500) == 1
    monkeypatch.setattr(parallel, "available_memory_gib", lambda: None)   # no /proc/meminfo
    assert parallel.resolve_jobs("auto", 500) == 64


def test_available_memory_is_read_from_meminfo():
    from ltnet_keras.inference import parallel
    memory = parallel.available_memory_gib()
    assert memory is None or 0.1 < memory < 1e5


class DyingSegmenter:
    """Builds, then kills its process on the first scan (as the kernel's OOM killer would)."""

    def segment(self, image):
        import os
        os._exit(9)


def make_dying_segmenter():
    return DyingSegmenter()


@pytest.mark.slow
def test_a_dying_worker_stops_the_cohort_with_a_clear_message(tmp_path):
    from ltnet_keras.inference.cohort import segment_cohort
    from ltnet_keras.inference.parallel import CohortStopped
    scans = []
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
        scans.append((tmp_path / f"{name}.nii.gz",
                      {"labels": tmp_path / "out" / f"{name}.nii.gz"}))
    (tmp_path / "out").mkdir()
    # What a worker killed while writing leaves: a temporary label map (of the first scan,
    # the one handed out first).
    (tmp_path / "out" / ".a.partial-dead.nii.gz").write_bytes(b"half")
    with pytest.raises(CohortStopped) as error:
        segment_cohort(make_dying_segmenter, scans, jobs=2)
    message = str(error.value)
    assert "worker process" in message and "ended with exit code 9 while segmenting" in message
    assert "stopped after 0 of 3 scans were segmented" in message and "to resume" in message
    assert error.value.exit_code == 1
    assert not list((tmp_path / "out").iterdir())


def test_volume_errors_cross_processes_as_they_are():
    import pickle
    error = pickle.loads(pickle.dumps(VolumeError("/a/b.nii.gz", "no such file")))
    assert type(error) is VolumeError and str(error) == "/a/b.nii.gz: no such file"
    assert (error.source, error.problem) == ("/a/b.nii.gz", "no such file")


def test_workers_run_one_thread_each_but_register_with_the_users_itk_threads(monkeypatch):
    from ltnet_keras.inference.parallel import worker_environment
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    values = worker_environment()
    assert values["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"      # load_ants' default
    assert values["TF_NUM_INTRAOP_THREADS"] == values["OMP_NUM_THREADS"] == "1"
    # ANTs' affine depends on ITK's thread count: a worker keeps the serial run's.
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    assert worker_environment()["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "2"
    assert worker_environment()["TF_NUM_INTRAOP_THREADS"] == "1"
