"""Presets (Tables 1-2 rows), validation and YAML round trips of ExperimentConfig."""
import dataclasses

import ltnet_keras  # noqa: F401

import pytest
import yaml

from ltnet_keras.config import (EXTENSION_TERMS, PRESETS, ExperimentConfig, LossWeights,
                                apply_preset, config_from_dict, config_to_dict, load_config,
                                save_config)

TERMS = ("gan", "sim", "cyc", "smooth", "trans", "anatomy_cyc", "diff_cyc")

# The non-zero terms of each row and their Eq. (11) multipliers.
EXPECTED = {
    "voxelmorph": {"sim": 1.0, "smooth": 1.0},
    "gan": {"sim": 1.0, "smooth": 3.0, "gan": 1.0},
    "gan_cyc": {"sim": 1.0, "smooth": 3.0, "gan": 1.0, "cyc": 10.0},
    "trans": {"sim": 1.0, "smooth": 3.0, "gan": 1.0, "cyc": 10.0, "trans": 3.0},
    "anatomy": {"sim": 1.0, "smooth": 3.0, "gan": 1.0, "cyc": 10.0, "anatomy_cyc": 3.0},
    "trans_anatomy": {"sim": 1.0, "smooth": 3.0, "gan": 1.0, "cyc": 10.0, "trans": 3.0,
                      "anatomy_cyc": 3.0},
    "ltnet": {"gan": 1.0, "sim": 1.0, "cyc": 10.0, "smooth": 3.0, "trans": 3.0,
              "anatomy_cyc": 3.0, "diff_cyc": 3.0},
}


def test_every_preset_is_tested():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_switches_exactly_its_terms(preset):
    config = apply_preset(ExperimentConfig(), preset)
    assert config.preset == preset
    active = {k: v for k, v in config.weights.terms().items() if v > 0}
    assert active == EXPECTED[preset]
    # Eq. (11)'s seven terms, plus the extensions beyond the paper, which no preset switches on.
    assert set(config.weights.terms()) == set(TERMS) | set(EXTENSION_TERMS)


def test_ltnet_uses_the_eq11_weights():
    weights = apply_preset(ExperimentConfig(), "ltnet").weights
    assert [getattr(weights, t) for t in TERMS] == [1, 1, 10, 3, 3, 3, 3]
    from ltnet_keras.losses import EQ11_WEIGHTS
    assert {t: w for t, w in weights.terms().items() if t not in EXTENSION_TERMS} == EQ11_WEIGHTS


def test_apply_preset_keeps_the_ncc_window():
    config = ExperimentConfig(weights=LossWeights(ncc_window=5))
    assert apply_preset(config, "voxelmorph").weights.ncc_window == 5


@pytest.mark.parametrize("preset, backward, discriminator, labels", [
    ("voxelmorph", False, False, False),
    ("gan", False, True, False),
    ("gan_cyc", True, True, False),
    ("trans", True, True, False),
    ("anatomy", True, True, True),
    ("trans_anatomy", True, True, True),
    ("ltnet", True, True, True),
])
def test_which_networks_and_inputs_a_preset_needs(preset, backward, discriminator, labels):
    weights = apply_preset(ExperimentConfig(), preset).weights
    assert weights.needs_backward is backward
    assert weights.needs_discriminator is discriminator
    assert weights.needs_atlas_labels is labels


def test_needs_atlas_labels_for_diff_cyc_alone():
    weights = dataclasses.replace(apply_preset(ExperimentConfig(), "voxelmorph").weights,
                                  diff_cyc=3.0)
    assert weights.needs_atlas_labels and weights.needs_backward


def _small_config(**train):
    return config_from_dict({
        "name": "roundtrip", "preset": "trans",
        "data": {"atlas": "S11", "train_subjects": ["S11", "S12"], "val_subjects": ["S13"],
                 "crop_shape": [128, 192, 128], "factor": 4},
        "network": {"enc_features": [8, 16, 16, 16]},
        "train": dict({"steps": 20, "log_every": 10, "seed": 3}, **train),
        "segment": {"label_interp": "nearest"}})


def test_yaml_round_trip(tmp_path):
    config = _small_config()
    path = tmp_path / "config.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.data.crop_shape == (128, 192, 128)
    assert loaded.data.network_shape == (32, 48, 32)
    assert loaded.weights == apply_preset(ExperimentConfig(), "trans").weights
    assert not (tmp_path / "config.yaml.tmp").exists()
    # plain YAML (lists, not Python tuples)
    assert yaml.safe_load(path.read_text())["data"]["crop_shape"] == [128, 192, 128]


def test_explicit_weights_override_the_preset():
    config = config_from_dict({"preset": "voxelmorph", "weights": {"smooth": 0.5}})
    assert config.weights.smooth == 0.5 and config.weights.sim == 1.0
    assert config.weights.gan == 0.0


def test_overrides_win(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(_small_config(), path)
    config = load_config(path, {"train.steps": 5, "preset": "gan", "data.factor": 2})
    assert config.train.steps == 5
    assert config.preset == "gan"
    assert {k: v for k, v in config.weights.terms().items() if v > 0} == EXPECTED["gan"]
    assert config.data.factor == 2 and config.data.network_shape == (64, 96, 64)
    assert config.train.seed == 3  # untouched keys stay
    assert load_config(path).train.steps == 20  # the file itself is unchanged


def test_overrides_create_missing_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = load_config(path, {"train.seed": 7})
    assert config.train.seed == 7
    assert config == dataclasses.replace(ExperimentConfig(), train=dataclasses.replace(
        ExperimentConfig().train, seed=7))


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown keys.*'stepz'") as error:
        config_from_dict({"train": {"stepz": 3}})
    assert "steps" in str(error.value) and "learning_rate" in str(error.value)
    with pytest.raises(ValueError, match="unknown keys.*'colour'"):
        config_from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="weights.*'gamma'"):
        config_from_dict({"weights": {"gamma": 1.0}})


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  rooot: /x\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(path)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown preset 'ltnett'") as error:
        config_from_dict({"preset": "ltnett"})
    for name in PRESETS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="valid"):
        apply_preset(ExperimentConfig(), "cyclegan")


def test_bad_label_interp_lists_the_choices():
    with pytest.raises(ValueError, match="label_interp 'cubic'.*linear, nearest"):
        config_from_dict({"segment": {"label_interp": "cubic"}})


def test_bad_disc_norm():
    with pytest.raises(ValueError, match="instance"):
        config_from_dict({"network": {"disc_norm": "layer"}})


@pytest.mark.parametrize("crop, factor", [([160, 192, 160], 4), ([120, 192, 128], 4),
                                          ([100, 100, 100], 1)])
def test_network_grid_not_divisible_by_16(crop, factor):
    with pytest.raises(ValueError, match="divisible by 16"):
        config_from_dict({"data": {"crop_shape": crop, "factor": factor}})


def test_crop_not_divisible_by_factor():
    with pytest.raises(ValueError, match="not divisible by data.factor 3"):
        config_from_dict({"data": {"crop_shape": [128, 192, 128], "factor": 3}})


def test_bad_steps_and_checkpoint_every():
    with pytest.raises(ValueError, match="steps"):
        config_from_dict({"train": {"steps": -1}})
    with pytest.raises(ValueError, match="checkpoint_every"):
        config_from_dict({"train": {"checkpoint_every": 0}})


def test_default_config_is_valid_and_is_ltnet():
    config = config_from_dict({})
    assert config.preset == "ltnet"
    assert config.data.network_shape == (80, 96, 80)
    assert config_to_dict(config)["data"]["crop_shape"] == [160, 192, 160]
