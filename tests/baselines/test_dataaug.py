"""DataAug (Zhao et al., CVPR 2019): appearance loss by hand, synthesis conventions, sampling
with known shifts, and the one-shot guarantee that no label map but the atlas' is read."""
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.baselines import dataaug
from ltnet_keras.baselines import segnet
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.data.synthetic import write_synthetic_dataset
from ltnet_keras.inference.segment import warp_image
from ltnet_keras.baselines.segnet_config import AppearanceConfig, segnet_config_from_dict


def identity_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                indexing="ij"), -1)


def constant_field(shape, shift):
    return np.broadcast_to(np.asarray(shift, np.float32), tuple(shape) + (3,)).copy()


# ----------------------------------------------------------------------------- appearance loss

def test_label_boundaries_mark_both_sides_of_every_face():
    labels = np.zeros((4, 2, 1), dtype=np.int32)
    labels[2:, 0, 0] = 5
    boundary = dataaug.label_boundaries(labels)
    # x: 0 | 0 5 across x = 1/2 in column y = 0; y: column y = 1 (all 0) meets 5 at x = 2, 3.
    expected = np.array([[0, 0], [1, 0], [1, 1], [1, 1]], dtype=bool)[..., None]
    np.testing.assert_array_equal(boundary, expected)


@pytest.mark.parametrize("labels_along_x, expected_factor", [
    ([0, 0, 0, 0], 1.0 / 3.0),   # no boundary: the x differences a^2, y and z none
    ([0, 0, 0, 1], 1.0 / 9.0),   # voxels 2, 3 on the boundary: one x difference of 3 kept
    ([0, 0, 1, 1], 0.0),         # voxels 1, 2 on the boundary: every x difference touches it
])
def test_boundary_masked_smoothness_by_hand(labels_along_x, expected_factor):
    a = 0.3
    delta = (a * np.arange(4, dtype=np.float32)).reshape(1, 4, 1, 1, 1) * np.ones((1, 4, 2, 2, 1))
    labels = np.broadcast_to(np.array(labels_along_x).reshape(4, 1, 1), (4, 2, 2))
    boundary = dataaug.label_boundaries(labels)
    value = dataaug.boundary_masked_smoothness(delta, boundary).numpy()
    np.testing.assert_allclose(value, [expected_factor * a * a], rtol=1e-6, atol=1e-9)


def test_appearance_loss_terms_by_hand():
    shape = (4, 4, 4)
    atlas = np.zeros((1, *shape, 1), np.float32)
    delta = np.full((1, *shape, 1), 0.5, np.float32)   # constant: no smoothness penalty
    scan = np.full((1, *shape, 1), 0.2, np.float32)
    field = constant_field(shape, (0.5, -1.0, 0.0))[None]
    terms = dataaug.appearance_loss_terms(atlas, delta, field, scan,
                                          np.zeros(shape), smooth=10.0)
    assert terms["reconstruction"].numpy() == pytest.approx([0.09])   # (0.5 - 0.2)^2
    assert terms["smoothness"].numpy() == pytest.approx([0.0])
    assert terms["total"].numpy() == pytest.approx([0.09])


# ----------------------------------------------------------------------------- synthesis

def test_fresh_appearance_model_changes_nothing_so_synthesis_is_the_warped_atlas():
    shape = (16, 16, 16)
    rng = np.random.default_rng(0)
    atlas = rng.random(shape).astype(np.float32)
    scan = rng.random(shape).astype(np.float32)
    model = dataaug.build_appearance_model(shape, AppearanceConfig(
        enc_features=[4, 8, 8, 8], dec_features=[8, 8, 8, 8, 4]))
    delta = model([atlas[None, ..., None], scan[None, ..., None]]).numpy()
    assert delta.shape == (1, *shape, 1) and not delta.any()
    field = constant_field(shape, (1.5, 0.0, -2.25))
    synthetic = dataaug.synthesise_image(atlas[None, ..., None], delta, field[None]).numpy()
    # Pull convention, borders clamped: the warped atlas samples atlas(t + field(t)).
    expected = warp_image(atlas, identity_grid(shape) + field)
    np.testing.assert_allclose(synthetic[0, ..., 0], expected, atol=1e-5)


def make_source(label_interp, fields, deltas, atlas_fraction=0.0):
    shape = (6, 5, 4)
    rng = np.random.default_rng(1)
    atlas = rng.random(shape).astype(np.float32)
    channels = rng.integers(0, 4, shape).astype(np.int32)
    return dataaug.SyntheticVolumes(atlas, channels, 4, np.stack(fields), np.stack(deltas),
                                    "SYN01", label_interp, atlas_fraction)


@pytest.mark.parametrize("label_interp", ["nearest", "linear"])
def test_sampled_volume_is_the_atlas_with_delta_j_warped_by_field_i(label_interp):
    shape = (6, 5, 4)
    fields = [constant_field(shape, (2.0, 0.0, 0.0)), constant_field(shape, (0.0, -1.0, 0.0))]
    deltas = [np.full(shape, 0.1, np.float32), np.full(shape, -0.2, np.float32)]
    source = make_source(label_interp, fields, deltas)
    eye = np.eye(4, dtype=np.float32)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for i, (shifted_x, shifted_y) in enumerate([(np.minimum(x + 2, 5), y),
                                                (x, np.maximum(y - 1, 0))]):
        for j, brightness in enumerate((0.1, -0.2)):
            image, labels = source.pair(i, j)
            np.testing.assert_allclose(image, source.atlas_image[shifted_x, shifted_y, z]
                                       + brightness, atol=1e-6)
            np.testing.assert_array_equal(
                labels, eye[source.atlas_label_channels[shifted_x, shifted_y, z]])


def test_linear_labels_at_half_a_voxel_average_the_two_neighbours():
    shape = (6, 5, 4)
    source = make_source("linear", [constant_field(shape, (0.5, 0.0, 0.0))],
                         [np.zeros(shape, np.float32)])
    _, labels = source.pair(0, 0)
    eye = np.eye(4, dtype=np.float32)
    c = source.atlas_label_channels
    np.testing.assert_allclose(labels[:5], 0.5 * (eye[c[:5]] + eye[c[1:]]), atol=1e-6)
    np.testing.assert_allclose(labels[5], eye[c[5]], atol=1e-6)  # clamped at the border
    nearest = make_source("nearest", [constant_field(shape, (0.4, 0.0, 0.0))],
                          [np.zeros(shape, np.float32)])
    np.testing.assert_array_equal(nearest.pair(0, 0)[1], eye[c])


def test_draws_are_a_function_of_seed_and_step_and_honour_the_atlas_fraction():
    shape = (6, 5, 4)
    fields = [constant_field(shape, (k, 0.0, 0.0)) for k in range(3)]
    deltas = [np.zeros(shape, np.float32)] * 2
    never = make_source("nearest", fields, deltas, atlas_fraction=0.0)
    always = make_source("nearest", fields, deltas, atlas_fraction=1.0)
    draws = [d for step in range(200) for d in never.draws(0, step)]
    assert None not in draws
    assert {d[0] for d in draws} == {0, 1, 2} and {d[1] for d in draws} == {0, 1}
    assert never.draws(0, 17, 3) == never.draws(0, 17, 3) != never.draws(1, 17, 3)
    images, targets = always.batch(0, 5, batch_size=2)
    assert images.shape == (2, *shape, 1) and targets.shape == (2, *shape, 4)
    np.testing.assert_array_equal(images[1, ..., 0], always.atlas_image)
    np.testing.assert_array_equal(targets[0].argmax(-1), always.atlas_label_channels)
    half = make_source("nearest", fields, deltas, atlas_fraction=0.25)
    shown = np.mean([d is None for step in range(400) for d in half.draws(0, step)])
    assert 0.18 < shown < 0.32


def test_mismatched_shapes_are_refused():
    shape = (6, 5, 4)
    with pytest.raises(ValueError, match="one grid"):
        make_source("nearest", [constant_field((6, 5, 5), (0, 0, 0))], [np.zeros(shape)])
    with pytest.raises(ValueError, match="label interpolation"):
        make_source("cubic", [constant_field(shape, (0, 0, 0))], [np.zeros(shape)])


# ----------------------------------------------------------------------------- appearance training

@pytest.mark.slow
def test_appearance_model_learns_a_brightness_change(tmp_path):
    shape = (16, 16, 16)
    rng = np.random.default_rng(0)
    atlas = rng.random(shape).astype(np.float32)
    labels = (atlas > 0.5).astype(np.int32)
    fields = np.stack([constant_field(shape, (1.0, 0.0, 0.0)),
                       constant_field(shape, (0.0, 2.0, -1.0))])
    # Each scan is the warped atlas 0.15 brighter: the best delta is 0.15 everywhere.
    scans = np.stack([warp_image(atlas, identity_grid(shape) + f) + 0.15 for f in fields])
    config = AppearanceConfig(steps=30, learning_rate=1e-2, smooth=0.02, log_every=5,
                              checkpoint_every=30, enc_features=[4, 8, 8, 8],
                              dec_features=[8, 8, 8, 8, 4])
    model = dataaug.train_appearance_model(atlas, labels, scans, fields, config,
                                           tmp_path / "appearance", seed=0, verbose=0)
    import csv
    with open(tmp_path / "appearance" / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    first, last = float(history[0]["reconstruction"]), float(history[-1]["reconstruction"])
    assert last < 0.2 * first, (first, last)
    deltas = dataaug.appearance_deltas(model, atlas, scans)
    assert deltas.shape == (2, *shape) and abs(float(deltas.mean()) - 0.15) < 0.05
    assert (tmp_path / "appearance" / dataaug.APPEARANCE_WEIGHTS).exists()


# ----------------------------------------------------------------------------- one-shot

@pytest.fixture
def one_shot_root(tmp_path):
    """A synthetic data set where the pool scan SYN02 keeps its label map (so reading it would
    succeed, and only the record of reads can tell) and SYN03 has none."""
    root = write_synthetic_dataset(tmp_path / "data", n_subjects=3, shape=(40, 40, 40),
                                   max_displacement=2.0)
    (root / "labels" / "SYN03.nii.gz").unlink()
    return root


def fake_voxelmorph_run(root, run_dir):
    """A finished-looking VoxelMorph run with an untrained G_F (what DataAug reads of a run)."""
    from ltnet_keras.config import config_from_dict, save_config
    from ltnet_keras.models.generators import make_generator
    from ltnet_keras.training import FORWARD_WEIGHTS
    config = config_from_dict({"name": "vm", "preset": "voxelmorph", "data": {
        "root": str(root), "crop_shape": [32, 32, 32], "factor": 1, "atlas": "SYN01",
        "train_subjects": ["SYN01", "SYN02", "SYN03"], "val_subjects": ["SYN03"]}})
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    tf.keras.utils.set_random_seed(3)
    make_generator((32, 32, 32), config.network, "forward_generator").save_weights(
        str(run_dir / FORWARD_WEIGHTS))
    table = LabelTable.from_tsv(root / "labels.tsv")
    (run_dir / "atlas.json").write_text(json.dumps({
        "atlas": "SYN01", "image": str(root / "images" / "SYN01.nii.gz"),
        "labels": str(root / "labels" / "SYN01.nii.gz"), "labels_tsv": str(root / "labels.tsv"),
        "label_ids": table.ids.tolist()}))
    return run_dir


@pytest.mark.slow
def test_dataaug_trains_reading_no_label_map_but_the_atlas(one_shot_root, tmp_path,
                                                           monkeypatch):
    from ltnet_keras.data import io
    spatial = fake_voxelmorph_run(one_shot_root, tmp_path / "voxelmorph")
    config = segnet_config_from_dict({
        "name": "dataaug", "method": "dataaug",
        "data": {"root": str(one_shot_root), "crop_shape": [32, 32, 32], "factor": 1,
                 "atlas": "auto", "train_subjects": ["SYN01", "SYN02", "SYN03"],
                 "val_subjects": ["SYN03"]},
        "network": {"enc_features": [4, 8, 8, 8], "dec_features": [8, 8, 8, 8, 4]},
        "train": {"steps": 4, "log_every": 2, "checkpoint_every": 4},
        "dataaug": {"spatial_run": str(spatial), "atlas_fraction": 0.5,
                    "appearance": {"steps": 4, "log_every": 2, "checkpoint_every": 4,
                                   "enc_features": [4, 8, 8, 8],
                                   "dec_features": [8, 8, 8, 8, 4]}}})
    read = []
    original = io._read

    def recording_read(path, key):
        read.append(str(path))
        return original(path, key)
    monkeypatch.setattr(io, "_read", recording_read)
    run = tmp_path / "dataaug"
    result = segnet.train_segnet(config, run, verbose=0)
    labels_read = {p for p in read if "/labels/" in p}
    assert labels_read == {str(one_shot_root / "labels" / "SYN01.nii.gz")}
    assert {p.rsplit("/", 1)[-1] for p in read if "/images/" in p} == \
        {"SYN01.nii.gz", "SYN02.nii.gz", "SYN03.nii.gz"}
    assert result.steps_done == 4 and result.source.labelled_subjects == ["SYN01"]
    record = json.loads((run / dataaug.RECORD).read_text())
    assert record["labelled_subjects"] == ["SYN01"] and record["pool"] == ["SYN02", "SYN03"]
    assert record["spatial_weights_sha256"] == segnet.spatial_run_digest(config)
    assert json.loads((run / segnet.RUN_RECORD).read_text())["labelled_subjects"] == ["SYN01"]
    assert (run / dataaug.APPEARANCE_DIR / dataaug.APPEARANCE_WEIGHTS).exists()
    # The synthetic labels come from the atlas: every one-hot target sums to one per voxel.
    _, targets = result.source.batch(0, 0, batch_size=2)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)

    # New VoxelMorph weights under the same run: the DataAug run refuses to resume on them.
    from ltnet_keras.models.generators import make_generator
    from ltnet_keras.inference.segment import Segmenter
    tf.keras.utils.set_random_seed(4)
    make_generator((32, 32, 32), Segmenter(spatial).config.network, "forward_generator") \
        .save_weights(str(spatial / "forward_generator.h5"))
    assert segnet.finished_scores(run, config) is None
    with pytest.raises(ValueError, match="changed since this DataAug run started"):
        segnet.train_segnet(config, run, verbose=0)


def test_spatial_run_must_exist_and_fit(one_shot_root, tmp_path):
    config = segnet_config_from_dict({"method": "dataaug", "data": {
        "root": str(one_shot_root), "crop_shape": [32, 32, 32], "factor": 1},
        "dataaug": {"spatial_run": str(tmp_path / "nothing")}})
    with pytest.raises(FileNotFoundError, match="not a finished VoxelMorph run"):
        dataaug.prepare_synthetic_source(config, tmp_path / "run", LabelTable.from_tsv(
            one_shot_root / "labels.tsv"), verbose=0)
    spatial = fake_voxelmorph_run(one_shot_root, tmp_path / "vm")
    other_grid = segnet_config_from_dict({"method": "dataaug", "data": {
        "root": str(one_shot_root), "crop_shape": [32, 32, 32], "factor": 2, "atlas": "SYN01"},
        "dataaug": {"spatial_run": str(spatial)}})
    with pytest.raises(ValueError, match="does not fit this run: grid"):
        dataaug.prepare_synthetic_source(other_grid, tmp_path / "run", LabelTable.from_tsv(
            one_shot_root / "labels.tsv"), verbose=0)
    shutil.rmtree(spatial)
