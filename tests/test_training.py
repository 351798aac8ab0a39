"""train(): learning on real LPBA40 data, kill-and-resume, the NaN guard, the run directory.

Learning and the run directory use the 32x48x32 grid (crop 128x192x128, factor 4); the
resume/kill/NaN mechanics use a 16^3 grid (crop 64^3, factor 4) to stay fast. The atlas is S11
and the unlabelled pool is the one real target S12.
"""
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.config import apply_preset, config_from_dict, load_config, save_config
from ltnet_keras.training import (BACKWARD_WEIGHTS, FORWARD_WEIGHTS, NonFiniteLossError,
                                  build_model, train, train_seconds)

CROP = [128, 192, 128]        # -> 32x48x32
SMALL_CROP = [64, 64, 64]     # -> 16x16x16
FACTOR = 4


def make_config(root, steps, crop=CROP, preset="voxelmorph", **train_options):
    return config_from_dict({
        "name": "test", "preset": preset,
        "data": {"root": str(root), "atlas": "S11", "train_subjects": ["S11", "S12"],
                 "val_subjects": ["S12"], "crop_shape": list(crop), "factor": FACTOR},
        "train": dict({"steps": steps, "log_every": 10, "checkpoint_every": 10, "seed": 0},
                      **train_options)})


def history_rows(run_dir):
    with open(Path(run_dir) / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def history_steps(run_dir):
    return [int(float(r["step"])) for r in history_rows(run_dir)]


def checkpoint_step(run_dir):
    """Step of the checkpoint the index points to (None if there is none)."""
    latest = tf.train.latest_checkpoint(str(Path(run_dir) / "checkpoints"))
    return None if latest is None else int(latest.rsplit("-", 1)[1])


# Runs shared by several tests (and by test_segment.py): trained once per session.
_RUNS = {}


def _cached(name, tmp_path_factory, build):
    if name not in _RUNS:
        _RUNS[name] = build(tmp_path_factory.mktemp(name) / "run")
    return _RUNS[name]


def base_run(tmp_path_factory, root) -> Path:
    """10 steps of `voxelmorph` at 32x48x32 (S11 -> S12). Do not modify: copy it."""
    def build(run):
        result = train(make_config(root, 10), run, verbose=0)
        assert result.steps_done == 10 and result.resumed_from == 0
        return run
    return _cached("vxm10", tmp_path_factory, build)


def small_run(tmp_path_factory, root) -> Path:
    """20 steps of `voxelmorph` at 16^3, checkpoints at 10 and 20. Do not modify: copy it."""
    def build(run):
        result = train(make_config(root, 20, crop=SMALL_CROP), run, verbose=0)
        assert result.steps_done == 20 and result.resumed_from == 0
        return run
    return _cached("small20", tmp_path_factory, build)


def copy_run(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ------------------------------------------------------------------------------ (a) learning

def network_grid_dice(model, data, truth, table):
    """Mean Dice (over labels) of the atlas labels warped by G_F against the target's labels."""
    from ltnet_keras.evaluation import dice_per_label
    atlas = tf.constant(data.atlas.image[None, ..., None])
    target = tf.constant(data.targets[0].image[None, ..., None])
    field = model.forward_generator([atlas, target], training=False)
    warped = model.warp_labels([tf.constant(data.atlas_one_hot[None]), field]).numpy()[0]
    prediction = table.to_ids(np.argmax(warped, axis=-1))
    scores = dice_per_label(prediction, truth, table.ids)
    return float(np.nanmean(list(scores.values())))


@pytest.mark.slow
def test_voxelmorph_training_lowers_the_loss_and_raises_dice(tmp_path_factory, lpba40_root,
                                                             tmp_path):
    from ltnet_keras.data.dataset import prepare_subject
    from ltnet_keras.evaluation import dice_per_label
    config = make_config(lpba40_root, 40)
    # 40 steps: the shared 10-step run, resumed to 40 in a copy.
    run = copy_run(base_run(tmp_path_factory, lpba40_root), tmp_path)
    result = train(config, run, verbose=0)
    assert result.resumed_from == 10 and result.steps_done == 40
    rows = history_rows(run)
    assert [int(float(r["step"])) for r in rows] == [10, 20, 30, 40]
    first, last = float(rows[0]["total"]), float(rows[-1]["total"])
    assert last < first, f"mean total loss of steps 31-40 ({last}) not below steps 1-10 ({first})"

    data, table = result.data, result.data.table
    assert data.atlas.subject == "S11" and [t.subject for t in data.targets] == ["S12"]
    truth = prepare_subject(lpba40_root / "images" / "S12.nii.gz",
                            lpba40_root / "labels" / "S12.nii.gz", config.data.crop_shape,
                            config.data.factor, table).labels
    assert truth.shape == (32, 48, 32) == data.atlas.image.shape
    tf.keras.utils.set_random_seed(config.train.seed)
    start_model = build_model(config, data.atlas.image.shape)  # the untrained G_F of this seed
    before = network_grid_dice(start_model, data, truth, table)
    after = network_grid_dice(result.model, data, truth, table)
    no_warp = float(np.nanmean(list(dice_per_label(data.atlas.labels, truth, table.ids).values())))
    message = (f"atlas->target mean label Dice on the 32x48x32 grid: no warp {no_warp:.4f}, "
               f"untrained {before:.4f}, after 40 steps {after:.4f}; total loss "
               f"{first:.4f} -> {last:.4f}")
    print(message)
    assert abs(before - no_warp) < 0.01, message  # untrained field ~ identity
    assert after > before + 0.02, message


# ------------------------------------------------------------------------------ (b) resume

@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tmp_path_factory, lpba40_root, tmp_path):
    run = copy_run(small_run(tmp_path_factory, lpba40_root), tmp_path)
    assert checkpoint_step(run) == 20
    assert history_steps(run) == [10, 20]
    result = train(make_config(lpba40_root, 30, crop=SMALL_CROP), run, verbose=0)
    assert result.resumed_from == 20
    assert result.steps_done == 30
    assert int(result.model.generator_optimizer.iterations.numpy()) == 30
    # the training clock adds this sitting's time to the first sitting's
    first_sitting = train_seconds(small_run(tmp_path_factory, lpba40_root))
    assert first_sitting > 0
    assert train_seconds(run) > first_sitting
    assert history_steps(run) == [10, 20, 30]
    assert checkpoint_step(run) == 30
    saved = load_config(run / "config.yaml")
    assert saved.train.steps == 30


@pytest.mark.slow
def test_resume_restores_the_trained_weights(tmp_path_factory, lpba40_root, tmp_path):
    """Resuming a finished run trains nothing and gives back exactly the saved G_F."""
    source = small_run(tmp_path_factory, lpba40_root)
    run = copy_run(source, tmp_path)
    result = train(make_config(lpba40_root, 20, crop=SMALL_CROP), run, verbose=0)
    assert result.resumed_from == 20 and result.steps_done == 20
    assert history_steps(run) == [10, 20]
    assert train_seconds(run) == train_seconds(source)  # no step, no time added
    from ltnet_keras.models.generators import make_generator
    saved = make_generator(result.data.atlas.image.shape,
                           make_config(lpba40_root, 20, crop=SMALL_CROP).network, "saved")
    saved.load_weights(str(source / FORWARD_WEIGHTS))
    for a, b in zip(saved.get_weights(), result.model.forward_generator.get_weights()):
        np.testing.assert_array_equal(a, b)
    # the Adam state came back too
    assert int(result.model.generator_optimizer.iterations.numpy()) == 20


@pytest.mark.slow
def test_backward_generator_is_saved_only_when_trained(tmp_path_factory, lpba40_root, tmp_path):
    """An objective with a backward path leaves G_B's final weights (Fig. 3's reconstructed
    atlas needs them); VoxelMorph has no G_B and leaves none."""
    assert not (small_run(tmp_path_factory, lpba40_root) / BACKWARD_WEIGHTS).exists()
    # 2 steps: enough to move G_B away from its initial weights, which is all this reads.
    config = make_config(lpba40_root, 2, crop=SMALL_CROP, preset="gan_cyc", log_every=2,
                         checkpoint_every=2)
    result = train(config, tmp_path / "run", verbose=0)
    from ltnet_keras.models.generators import make_generator
    saved = make_generator(result.data.atlas.image.shape, config.network, "saved")
    saved.load_weights(str(tmp_path / "run" / BACKWARD_WEIGHTS))
    trained = result.model.backward_generator.get_weights()
    assert any(np.any(w != 0) for w in trained)
    for a, b in zip(saved.get_weights(), trained):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_killed_cli_run_resumes(lpba40_root, tmp_path):
    config_path = tmp_path / "config.yaml"
    save_config(make_config(lpba40_root, 40, crop=SMALL_CROP), config_path)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ltnet_keras.cli", "train", "--config", str(config_path),
               "--out", str(run)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if (run / "checkpoints" / "checkpoint").exists() and (checkpoint_step(run) or 0) >= 10:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint before the process ended or the deadline: "
                        + (tmp_path / "first.log").read_text()[-2000:])
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(run)
    assert killed_at is not None and 10 <= killed_at < 40, killed_at
    assert not (run / FORWARD_WEIGHTS).exists()  # it never finished

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"trained 40 steps (resumed from {killed_at})" in second.stdout, second.stdout
    steps = history_steps(run)
    assert steps == [10, 20, 30, 40], steps
    assert checkpoint_step(run) == 40
    assert (run / FORWARD_WEIGHTS).exists()


# ------------------------------------------------------------------------------ (c) NaN guard

@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path_factory,
                                                                  lpba40_root, tmp_path,
                                                                  monkeypatch):
    from ltnet_keras.losses import equations as losses
    run = copy_run(small_run(tmp_path_factory, lpba40_root), tmp_path)
    weights_before = (run / FORWARD_WEIGHTS).read_bytes()
    original = losses.similarity_loss

    def nan_similarity(target, prediction, window=9):
        return original(target, prediction, window) * float("nan")

    # Resumed at step 20, the first new step (21) has a NaN loss (the field itself is finite).
    monkeypatch.setattr(losses, "similarity_loss", nan_similarity)
    with pytest.raises(NonFiniteLossError) as error:
        train(make_config(lpba40_root, 30, crop=SMALL_CROP), run, verbose=0)
    message = str(error.value)
    assert "step 21" in message, message
    assert "ckpt-20" in message, message
    assert checkpoint_step(run) == 20
    assert sorted(p.name for p in (run / "checkpoints").glob("*.index")) == [
        "ckpt-10.index", "ckpt-20.index"]
    assert history_steps(run) == [10, 20]
    assert (run / FORWARD_WEIGHTS).read_bytes() == weights_before

    # the run goes on from the good checkpoint once the loss is fixed
    monkeypatch.setattr(losses, "similarity_loss", original)
    result = train(make_config(lpba40_root, 20, crop=SMALL_CROP), run, verbose=0)
    assert result.resumed_from == 20
    assert all(np.all(np.isfinite(w)) for w in result.model.forward_generator.get_weights())


@pytest.mark.slow
def test_nan_target_raises_non_finite_loss_error(tmp_path_factory, lpba40_root, tmp_path):
    from ltnet_keras.data.dataset import load_training_data
    run = copy_run(small_run(tmp_path_factory, lpba40_root), tmp_path)
    config = make_config(lpba40_root, 30, crop=SMALL_CROP)
    data = load_training_data(config.data)
    poisoned = dataclasses.replace(data, targets=[
        dataclasses.replace(t, image=np.full_like(t.image, np.nan)) for t in data.targets])
    with pytest.raises(NonFiniteLossError, match="step 21"):
        train(config, run, verbose=0, data=poisoned)
    assert checkpoint_step(run) == 20


# ------------------------------------------------------------------------------ (d) run dir

@pytest.mark.slow
def test_run_directory_contents(tmp_path_factory, lpba40_root):
    run = base_run(tmp_path_factory, lpba40_root)
    config = make_config(lpba40_root, 10)
    assert load_config(run / "config.yaml") == config

    environment = json.loads((run / "environment.json").read_text())
    assert environment["seed"] == 0
    assert environment["packages"]["tensorflow"] == tf.__version__
    assert environment["packages"]["voxelmorph"]
    assert environment["devices"]

    atlas = json.loads((run / "atlas.json").read_text())
    assert atlas["atlas"] == "S11"
    assert atlas["targets"] == ["S12"]
    assert Path(atlas["labels"]).name == "S11.nii.gz"
    from ltnet_keras.data.labels import LabelTable
    table = LabelTable.from_tsv(lpba40_root / "labels.tsv")
    assert atlas["label_ids"] == table.ids.tolist()
    assert atlas["grid"]["crop_shape"] == CROP and atlas["grid"]["factor"] == FACTOR

    rows = history_rows(run)
    assert [int(float(r["step"])) for r in rows] == [10]
    assert set(rows[0]) == {"step", "sim", "smooth", "total", "field_magnitude"}
    assert all(np.isfinite(float(v)) for v in rows[0].values())
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / FORWARD_WEIGHTS).stat().st_size > 0
    assert (run / "logs").is_dir() and any((run / "logs").rglob("*tfevents*"))
    assert checkpoint_step(run) == 10
    assert not list(run.glob("*.tmp*"))


def test_different_config_in_the_same_run_dir_raises(lpba40_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(make_config(lpba40_root, 10), run / "config.yaml")
    before = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match="different configuration"):
        train(make_config(lpba40_root, 10, learning_rate=1e-3), run, verbose=0)
    with pytest.raises(ValueError, match="different configuration"):
        train(apply_preset(make_config(lpba40_root, 10), "gan"), run, verbose=0)
    with pytest.raises(ValueError, match="different configuration"):
        train(make_config(lpba40_root, 10, crop=SMALL_CROP), run, verbose=0)
    assert (run / "config.yaml").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing else written


def test_steps_must_be_multiples_of_log_every(lpba40_root, tmp_path):
    with pytest.raises(ValueError, match="multiples of train.log_every"):
        train(make_config(lpba40_root, 15), tmp_path / "run", verbose=0)
