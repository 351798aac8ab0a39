"""The segmentation U-Net of Table 5's baselines: loss by hand, prediction on the scan's grid,
training that learns, resume, and scoring on the scan's own grid."""
import json

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras import evaluation
from ltnet_keras.baselines import segnet, unet
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.data.preprocess import GridSpec
from ltnet_keras.data.synthetic import write_synthetic_dataset
from ltnet_keras.baselines.segnet_config import load_segnet_config, segnet_config_from_dict


# ----------------------------------------------------------------------------- loss

def test_soft_dice_and_cross_entropy_by_hand():
    # Two voxels: the first is channel 0, the second channel 1.
    y_true = np.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 1, 2)
    y_pred = np.array([[0.8, 0.2], [0.4, 0.6]]).reshape(1, 2, 1, 1, 2)
    # Channel 0: overlap 0.8, |true| 1, |pred| 1.2; channel 1: overlap 0.6, |true| 1, |pred| 0.8.
    dice_smooth_1 = 1.0 - ((1.6 + 1.0) / (2.2 + 1.0) + (1.2 + 1.0) / (1.8 + 1.0)) / 2.0
    dice_exact = 1.0 - (1.6 / 2.2 + 1.2 / 1.8) / 2.0
    cross_entropy = -(np.log(0.8) + np.log(0.6)) / 2.0
    np.testing.assert_allclose(unet.soft_dice_loss(y_true, y_pred).numpy(), [dice_smooth_1],
                               rtol=1e-6)
    np.testing.assert_allclose(unet.soft_dice_loss(y_true, y_pred, smooth=0.0).numpy(),
                               [dice_exact], rtol=1e-6)
    np.testing.assert_allclose(unet.cross_entropy_loss(y_true, y_pred).numpy(),
                               [cross_entropy], rtol=1e-6)
    terms = unet.segmentation_loss_terms(y_true, y_pred, dice_weight=2.0,
                                           cross_entropy_weight=0.5)
    np.testing.assert_allclose(terms["total"].numpy(),
                               [2.0 * dice_smooth_1 + 0.5 * cross_entropy], rtol=1e-6)


def test_perfect_prediction_has_zero_loss_and_each_example_its_own():
    y = np.eye(3, dtype=np.float32)[np.array([0, 1, 2, 2]).reshape(1, 4, 1, 1)]
    wrong = np.roll(y, 1, axis=-1)
    both = np.concatenate([y, y]), np.concatenate([y, wrong])
    dice = unet.soft_dice_loss(*both).numpy()
    assert dice[0] == pytest.approx(0.0, abs=1e-7) and dice[1] > 0.5
    cross_entropy = unet.cross_entropy_loss(*both).numpy()
    assert cross_entropy[0] == pytest.approx(0.0, abs=1e-6)
    assert cross_entropy[1] == pytest.approx(-np.log(1e-7), rel=1e-5)  # clipped log(0)


# ----------------------------------------------------------------------------- back to the scan

def test_probabilities_go_back_linearly_between_block_centres():
    # Network grid (2, 1, 1) at factor 2: block centres at cropped x = 0.5 and 2.5; the crop
    # starts at original x = 1 of 6, so original x = 0 and 5 are outside (background).
    grid = GridSpec((6, 2, 2), (1, 0, 0), (4, 2, 2), factor=2)
    probabilities = np.array([[0.0, 0.45, 0.55], [0.0, 1.0, 0.0]]).reshape(2, 1, 1, 3)
    channels = segnet.probabilities_to_channels(probabilities, grid)
    assert channels.shape == (6, 2, 2)
    # Cropped x = 1 lies a quarter of the way: 0.75 * (.45, .55) + 0.25 * (1, 0) = (.59, .41),
    # so channel 1 where the nearest block would say channel 2.
    np.testing.assert_array_equal(channels[:, 0, 0], [0, 2, 1, 1, 1, 0])
    assert (channels == channels[:, :1, :1]).all()
    with pytest.raises(ValueError, match="network grid"):
        segnet.probabilities_to_channels(probabilities[:1], grid)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("change, message", [
    ({"method": "fully"}, "method"),
    ({"train": {"steps": 15}}, "multiples of log_every"),
    ({"data": {"crop_shape": [96, 96, 96], "factor": 4}}, "divisible by 16"),
    ({"dataaug": {"label_interp": "cubic"}}, "label_interp"),
    ({"dataaug": {"atlas_fraction": 1.5}}, "atlas_fraction"),
    ({"train": {"dice_weight": 0.0, "cross_entropy_weight": 0.0}}, "not both 0"),
    ({"network": {"features": [8]}}, "unknown keys"),
])
def test_bad_config_is_refused_naming_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        segnet_config_from_dict(change, where="my.yaml")


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(root, n_subjects=3, shape=(40, 40, 40), max_displacement=2.0)


def tiny_config(root, steps, **train):
    return segnet_config_from_dict({
        "name": "tiny", "method": "supervised",
        "data": {"root": str(root), "crop_shape": [32, 32, 32], "factor": 1, "atlas": "SYN01",
                 "train_subjects": ["SYN01", "SYN02"], "val_subjects": ["SYN03"]},
        "network": {"enc_features": [8, 16, 16, 16], "dec_features": [16, 16, 16, 16, 16, 8]},
        "train": {"steps": steps, "log_every": 5, "checkpoint_every": 10, "seed": 0,
                  "learning_rate": 3e-3, **train}})


def network_grid_dice(model, volumes: segnet.LabelledVolumes, table: LabelTable) -> float:
    probabilities = model(volumes.images[..., None], training=False).numpy()
    scores = [evaluation.evaluate_pair(table.to_ids(p.argmax(-1)), table.to_ids(truth), table)
              for p, truth in zip(probabilities, volumes.label_channels)]
    return float(np.mean([s.mean_structure for s in scores]))


@pytest.mark.slow
def test_training_raises_dice_and_scores_on_the_scan_grid(synthetic_root, tmp_path):
    config = tiny_config(synthetic_root, steps=40)
    table = LabelTable.from_tsv(synthetic_root / "labels.tsv")
    volumes = segnet.load_labelled_volumes(config, table)
    tf.keras.utils.set_random_seed(0)
    untrained = segnet.build_segnet(config.data.network_shape, table.n_channels, config.network)
    before = network_grid_dice(untrained, volumes, table)
    result = segnet.train_segnet(config, tmp_path / "run", verbose=0)
    after = network_grid_dice(result.model, volumes, table)
    assert after > before + 0.3, (before, after)
    history = [row for row in csv_rows(tmp_path / "run" / "history.csv")]
    assert [int(r["step"]) for r in history] == list(range(5, 45, 5))
    assert float(history[-1]["total"]) < float(history[0]["total"])
    record = json.loads((tmp_path / "run" / segnet.RUN_RECORD).read_text())
    assert record["labelled_subjects"] == ["SYN01", "SYN02"]

    # Scored like the registration rows: label ids on the held-out scan's own 40^3 grid.
    scores = segnet.run_segnet_experiment(config, tmp_path / "run", verbose=0)
    assert [s.subject for s in scores] == ["SYN03"] and scores[0].mean_structure > 0.3
    written = tmp_path / "run" / segnet.SEGMENTATIONS_DIR / "SYN03.nii.gz"
    from ltnet_keras.data.io import load_label_map
    labels = load_label_map(written).array
    assert labels.shape == (40, 40, 40) and set(np.unique(labels)) <= {0, *table.ids.tolist()}
    assert [s.subject for s in evaluation.read_scores_csv(tmp_path / "run" / segnet.SCORES)] \
        == ["SYN03"]
    # A finished, scored run is read back, not redone.
    weights_time = (tmp_path / "run" / segnet.SEGNET_WEIGHTS).stat().st_mtime
    again = segnet.run_segnet_experiment(config, tmp_path / "run", verbose=0)
    assert again[0].structures == pytest.approx(scores[0].structures, abs=1e-6)  # 6 decimals
    assert (tmp_path / "run" / segnet.SEGNET_WEIGHTS).stat().st_mtime == weights_time


def csv_rows(path):
    import csv
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_resume_continues_to_the_uninterrupted_weights(synthetic_root, tmp_path):
    straight = segnet.train_segnet(tiny_config(synthetic_root, steps=20), tmp_path / "straight",
                                   verbose=0)
    segnet.train_segnet(tiny_config(synthetic_root, steps=10), tmp_path / "resumed", verbose=0)
    resumed = segnet.train_segnet(tiny_config(synthetic_root, steps=20), tmp_path / "resumed",
                                  verbose=0)
    assert resumed.resumed_from == 10 and resumed.steps_done == straight.steps_done == 20
    for a, b in zip(straight.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    steps = [int(r["step"]) for r in csv_rows(tmp_path / "resumed" / "history.csv")]
    assert steps == [5, 10, 15, 20]
    # Only train.steps may change when a run resumes.
    with pytest.raises(ValueError, match="different configuration"):
        segnet.train_segnet(tiny_config(synthetic_root, steps=20, learning_rate=1e-4),
                            tmp_path / "resumed", verbose=0)


def test_config_round_trip(tmp_path):
    from ltnet_keras.baselines.segnet_config import save_segnet_config
    config = segnet_config_from_dict({"method": "dataaug", "dataaug": {
        "spatial_run": "runs/x", "appearance": {"steps": 20, "smooth": 0.5}}})
    save_segnet_config(config, tmp_path / "c.yaml")
    again = load_segnet_config(tmp_path / "c.yaml", {"train.steps": 30})
    assert again.dataaug == config.dataaug and again.train.steps == 30
    assert again.data.crop_shape == config.data.crop_shape


# ----------------------------------------------------------------------------- Tables 5 and 4

@pytest.fixture(scope="module")
def table_scripts():
    import sys
    from pathlib import Path
    experiments = Path(__file__).resolve().parents[2] / "experiments"
    sys.path.insert(0, str(experiments))
    import table4_structures  # noqa: E402  (imported the way the scripts import each other)
    import table5_sota
    return table5_sota, table4_structures


def test_table5_configs_share_one_protocol(table_scripts):
    """Every row of Tables 4-5 (one YAML each): grid 32x48x32, atlas auto, S11-S30 / S31-S40,
    seed 0; registration rows 1500 steps; the recipe row is LT-Net with other weights."""
    from ltnet_keras.config import load_config
    table5, _ = table_scripts
    folder = table5.CONFIG_DIR / "table5"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(table5.ROWS)
    for row in table5.ROWS:
        registration = row in table5.REGISTRATION_ROWS
        config = (load_config if registration else load_segnet_config)(folder / f"{row}.yaml")
        assert config.name == f"table5_{row}"
        data = config.data
        assert data.crop_shape == (128, 192, 128) and data.factor == 4 and data.atlas == "auto"
        assert data.train_subjects == [f"S{i}" for i in range(11, 31)]
        assert data.val_subjects == [f"S{i}" for i in range(31, 41)]
        assert config.train.seed == 0
        assert config.train.steps == (1500 if registration else 1000)
    assert load_config(folder / "ltnet_tuned.yaml").preset == "ltnet"
    assert load_config(folder / "ltnet_tuned.yaml").weights.gan == 0.0
    assert load_segnet_config(folder / "unet.yaml").method == "supervised"
    assert load_segnet_config(folder / "dataaug.yaml").method == "dataaug"


EVERY_METHOD = ["Atlas labels, no registration", "VoxelMorph", "DataAug",
                "LT-Net (paper weights)", "LT-Net (recipe)", "U-Net (upper bound)"]


# 2 training steps for every row instead of the smoke's 10: no assertion reads what a network
# learned, only which rows were trained, scored, read back or reused.
SHORT = ["--steps", "2", "--set", "train.log_every=2", "--set", "train.checkpoint_every=2"]
SHORT_SEG = SHORT + [f"--set-seg={key}=2" for key in (
    "train.steps", "train.log_every", "train.checkpoint_every", "dataaug.appearance.steps",
    "dataaug.appearance.log_every", "dataaug.appearance.checkpoint_every")]


@pytest.mark.slow
def test_table5_and_table4_smoke_runs_write_every_output(lpba40_root, table_scripts, tmp_path,
                                                         capsys):
    table5, table4 = table_scripts
    out5, out4 = tmp_path / "table5", tmp_path / "table4"
    table5.main(["--smoke", "--out", str(out5), "--verbose", "0", *SHORT_SEG])
    markdown = (out5 / "table5.md").read_text()
    methods = [line.split("|")[1].strip() for line in markdown.splitlines()
               if line.startswith("| ")][1:]
    assert methods == EVERY_METHOD
    assert "80.4 (4.3)" in markdown and "86.5 (6.3)" in markdown   # the paper's rows beside
    assert len((out5 / "table5.csv").read_text().splitlines()) == 1 + len(EVERY_METHOD)
    subjects = csv_rows(out5 / "table5_subjects.csv")
    assert [(r["method"], r["subject"]) for r in subjects] == [(m, "S13") for m in EVERY_METHOD]
    assert (out5 / "table5.png").read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((out5 / "provenance.json").read_text())
    assert set(provenance["configs"]) == {"voxelmorph", "ltnet", "ltnet_tuned", "dataaug", "unet"}
    assert set(provenance["seeds"].values()) == {0}
    for row in ("voxelmorph", "ltnet", "ltnet_tuned"):
        for name in ("forward_generator.h5", "config.yaml", "atlas.json", "history.csv",
                     "results.md"):
            assert (out5 / row / name).exists(), (row, name)
    # One-shot: DataAug used the atlas' labels only, the upper bound every training scan's.
    assert json.loads((out5 / "dataaug" / "dataaug.json").read_text())["labelled_subjects"] \
        == ["S11"]
    assert json.loads((out5 / "unet" / segnet.RUN_RECORD).read_text())["labelled_subjects"] \
        == ["S11", "S12"]
    capsys.readouterr()

    # Table 4 reads every finished row of Table 5 back instead of training it again.
    weights = {row: (out5 / row / name).stat().st_mtime for row, name in [
        ("voxelmorph", "forward_generator.h5"), ("dataaug", segnet.SEGNET_WEIGHTS),
        ("unet", segnet.SEGNET_WEIGHTS)]}
    table4.main(["--smoke", "--table5", str(out5), "--out", str(out4), "--verbose", "0",
                *SHORT_SEG])
    assert capsys.readouterr().out.count("finished and scored") == 5
    assert weights == {row: (out5 / row / name).stat().st_mtime for row, name in [
        ("voxelmorph", "forward_generator.h5"), ("dataaug", segnet.SEGNET_WEIGHTS),
        ("unet", segnet.SEGNET_WEIGHTS)]}
    structure_rows = csv_rows(out4 / "table4.csv")
    assert sorted({r["method"] for r in structure_rows}) == sorted(EVERY_METHOD)
    n_structures = len(LabelTable.from_tsv(lpba40_root / "labels.tsv").structure_ids())
    assert len(structure_rows) == len(EVERY_METHOD) * n_structures
    header = [line for line in (out4 / "table4.md").read_text().splitlines()
              if line.startswith("Structure ")][0]
    assert all(method in header for method in EVERY_METHOD)
    assert (out4 / "table4_structures.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out4 / "provenance.json").read_text())["table5_dir"] == str(out5)

    # A finished run given with --runs is copied (no checkpoints) and segments from there.
    out5b = tmp_path / "table5_reused"
    table5.main(["--smoke", "--rows", "voxelmorph", "--runs", f"voxelmorph={out5 / 'voxelmorph'}",
                 "--out", str(out5b), "--verbose", "0", *SHORT_SEG])
    installed = out5b / "voxelmorph"
    assert not (installed / "checkpoints").exists()
    assert json.loads((installed / table5.INSTALLED).read_text())["source"] == \
        str((out5 / "voxelmorph").resolve())
    from ltnet_keras.inference.segment import Segmenter
    Segmenter(installed)   # what `ltnet segment --run` loads
    reused = csv_rows(out5b / "table5_subjects.csv")
    original = {r["method"]: r["mean_structure"] for r in subjects}
    assert [(r["method"], r["mean_structure"]) for r in reused] == \
        [(m, original[m]) for m in EVERY_METHOD[:2]]
