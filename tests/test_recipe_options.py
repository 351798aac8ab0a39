"""The recipe options of issue 6, each against a value computed by hand or a known behaviour:
gradient-norm diagnostics, Charbonnier penalties, GAN options, G_F freezing, cycle-gradient
routing, init_from, the folding metric and the search table's bookkeeping."""
import dataclasses
import math

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras import evaluation
from ltnet_keras.losses import equations as losses
from ltnet_keras.study import search
from ltnet_keras.config import ExperimentConfig, PenaltyConfig, apply_preset, config_from_dict
from ltnet_keras.models.ltnet import gradient_gate
from ltnet_keras.training import EveryNthStep, build_model, train

SHAPE = (16, 16, 16)


def random_batch(shape=SHAPE, channels=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, channels, (1,) + shape)
    return {"atlas": tf.constant(rng.random((1,) + shape + (1,), dtype=np.float32)),
            "atlas_labels": tf.constant(np.eye(channels, dtype=np.float32)[labels]),
            "target": tf.constant(rng.random((1,) + shape + (1,), dtype=np.float32))}


def ltnet_config(weights=None, penalties=None, **train):
    config = apply_preset(ExperimentConfig(), "ltnet")
    if weights:
        config = dataclasses.replace(config, weights=dataclasses.replace(config.weights, **weights))
    if penalties:
        config = dataclasses.replace(config, penalties=PenaltyConfig(**penalties))
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def values(variables):
    return [v.numpy().copy() for v in variables]


def same(before, variables):
    return all(np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


# ----------------------------------------------------------------------------- penalties

def test_image_cycle_loss_l1_and_charbonnier_by_hand():
    atlas = np.zeros((1, 2, 2, 2, 1), np.float32)
    reconstructed = np.full((1, 2, 2, 2, 1), 0.3, np.float32)
    assert losses.image_cycle_loss(atlas, reconstructed).numpy() == pytest.approx([0.3])
    # (0.3^2 + 0.4^2)^0.5 = 0.5
    assert losses.image_cycle_loss(atlas, reconstructed, eps=0.4, gamma=0.5).numpy() == \
        pytest.approx([0.5], rel=1e-6)


def test_charbonnier_gradient_vanishes_at_zero_l1_does_not():
    """The point of the option: near a consistent cycle, L1 still pulls with slope 1."""
    x = tf.constant([[1e-3]])
    for eps, expected in ((0.0, 1.0), (0.05, 1e-3 / math.sqrt(1e-6 + 0.05 ** 2))):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = losses.image_cycle_loss(tf.zeros_like(x), x, eps=eps, gamma=0.5)
        assert tape.gradient(value, x).numpy()[0, 0] == pytest.approx(expected, rel=1e-4)


def test_penalty_options_reach_the_terms():
    """With G_F/G_B fields ~0 at initialisation, Eq. (8) sits at rho(0) = eps^(2 gamma)."""
    tf.keras.utils.set_random_seed(0)
    config = ltnet_config(penalties={"trans_eps": 0.5, "diff_eps": 0.2, "diff_gamma": 0.5})
    model = build_model(config, SHAPE)
    batch = random_batch()
    cycle = model.correspondence_cycle(batch["atlas"], batch["atlas_labels"], batch["target"])
    terms = model.generator_terms(cycle, batch["atlas"], batch["atlas_labels"], batch["target"])
    assert float(terms["trans"][0]) == pytest.approx(0.5 ** 0.9, abs=2e-3)
    # Eq. (10) at identity warps: |l - l| - |l - l| = 0 everywhere -> rho(0) = 0.2
    assert float(terms["diff_cyc"][0]) == pytest.approx(0.2, abs=2e-3)


@pytest.mark.parametrize("section, values_, message", [
    ("penalties", {"trans_eps": 0.0}, "must be > 0"),
    ("penalties", {"cyc_gamma": 1.5}, "gamma in"),
    ("train", {"discriminator_every": 0}, "discriminator_every"),
    ("train", {"label_smoothing": 1.0}, "label_smoothing"),
    ("train", {"freeze_forward_steps": -1}, "freeze_forward_steps"),
])
def test_bad_recipe_options_are_refused(section, values_, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({section: values_})


# ----------------------------------------------------------------------------- GAN options

def test_label_smoothing_by_hand():
    real, fake = np.full((1, 2, 2, 2, 1), 0.5, np.float32), np.zeros((1, 2, 2, 2, 1), np.float32)
    # 0.5 * ((0.5 - 0.8)^2 + 0) = 0.045
    assert losses.lsgan_discriminator_loss(real, fake, real_target=0.8).numpy() == \
        pytest.approx([0.045], rel=1e-5)


def test_every_nth_step_schedule():
    schedule = EveryNthStep(1e-3, 5)
    assert [float(schedule(tf.constant(s, tf.int64))) for s in (0, 1, 4, 5, 6, 10)] == \
        pytest.approx([1e-3, 0, 0, 1e-3, 0, 1e-3])


def test_discriminator_moves_only_on_its_steps_and_sees_noise():
    tf.keras.utils.set_random_seed(0)
    model = build_model(ltnet_config(discriminator_every=2, instance_noise=0.1,
                                     discriminator_learning_rate=1e-3), SHAPE)
    d_vars = model.discriminator.trainable_variables
    batch = random_batch()
    before = values(d_vars)
    model.train_step(batch)                  # step 0: D updated
    assert not same(before, d_vars)
    after_first = values(d_vars)
    model.train_step(batch)                  # step 1: learning rate 0
    assert same(after_first, d_vars)
    model.train_step(batch)                  # step 2: updated again
    assert not same(after_first, d_vars)
    images = tf.zeros((1,) + SHAPE + (1,))
    assert float(tf.math.reduce_std(model._discriminator_view(images))) == \
        pytest.approx(0.1, rel=0.05)


# ----------------------------------------------------------------------------- schedules

def test_gradient_gate_keeps_values_and_scales_gradients():
    x = tf.constant([1.0, -2.0])
    for is_open in (0.0, 1.0):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = gradient_gate(x, tf.constant(is_open))
            value = tf.reduce_sum(y * y)
        np.testing.assert_allclose(y.numpy(), x.numpy())
        np.testing.assert_allclose(tape.gradient(value, x).numpy(), is_open * 2 * x.numpy())


def test_frozen_forward_generator_waits_while_backward_learns():
    tf.keras.utils.set_random_seed(0)
    model = build_model(ltnet_config(weights={"gan": 0.0}, freeze_forward_steps=2), SHAPE)
    forward = model.forward_generator.trainable_variables
    backward = model.backward_generator.trainable_variables
    start_forward, start_backward = values(forward), values(backward)
    batch = random_batch()
    model.train_step(batch)
    model.train_step(batch)
    assert same(start_forward, forward), "G_F moved while frozen"
    assert not same(start_backward, backward), "G_B did not learn"
    model.train_step(batch)
    assert not same(start_forward, forward), "G_F still frozen after freeze_forward_steps"


def test_cycle_terms_reach_forward_field_only_after_routing_opens():
    tf.keras.utils.set_random_seed(0)
    model = build_model(ltnet_config(weights={"gan": 0.0}, cycle_backward_only_steps=1), SHAPE)
    batch = random_batch()
    args = (batch["atlas"], batch["atlas_labels"], batch["target"])
    closed = {k: float(v) for k, v in model.field_gradient_norms(*args).items()}
    for term in ("cyc", "trans", "anatomy_cyc", "diff_cyc"):
        assert closed[f"grad_{term}"] == 0.0, (term, closed)
    assert closed["grad_sim"] > 0.0 and closed["grad_smooth"] > 0.0
    model.generator_optimizer.iterations.assign(1)
    opened = {k: float(v) for k, v in model.field_gradient_norms(*args).items()}
    for term in ("cyc", "trans", "anatomy_cyc", "diff_cyc"):
        assert opened[f"grad_{term}"] > 0.0, (term, opened)


# ----------------------------------------------------------------------------- diagnostics

def smoothness_gradient_by_hand(field):
    """d/dfield of losses.smoothness_loss for one example ``(x, y, z, 3)``, in numpy."""
    gradient = np.zeros_like(field, dtype=np.float64)
    for axis in range(3):
        difference = np.diff(field, axis=axis).astype(np.float64)
        count = difference.size
        scale = 2.0 / (3.0 * count)
        lower = [slice(None)] * 4
        upper = [slice(None)] * 4
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        gradient[tuple(lower)] -= scale * difference
        gradient[tuple(upper)] += scale * difference
    return gradient


def test_gradient_norms_match_a_hand_computation():
    """VoxelMorph preset, smooth weight 2: grad_smooth = 2 * |dL_smooth/dfield| computed in
    numpy from the model's own field; field_magnitude = mean vector length."""
    tf.keras.utils.set_random_seed(0)
    config = apply_preset(ExperimentConfig(), "voxelmorph")
    config = dataclasses.replace(config, weights=dataclasses.replace(config.weights, smooth=2.0))
    model = build_model(config, SHAPE)
    batch = random_batch()
    norms = model.field_gradient_norms(batch["atlas"], batch["atlas_labels"], batch["target"])
    field = model.forward_generator([batch["atlas"], batch["target"]]).numpy()[0]
    expected = 2.0 * np.linalg.norm(smoothness_gradient_by_hand(field))
    assert float(norms["grad_smooth"]) == pytest.approx(expected, rel=1e-4)
    assert float(norms["field_magnitude"]) == pytest.approx(
        np.linalg.norm(field, axis=-1).mean(), rel=1e-5)
    assert set(norms) == {"grad_sim", "grad_smooth", "field_magnitude"}


@pytest.mark.slow
def test_history_logs_gradient_norms(lpba40_root, tmp_path):
    config = config_from_dict({
        "name": "diag", "preset": "ltnet", "weights": {"gan": 0.1},
        "data": {"root": str(lpba40_root), "atlas": "S11", "train_subjects": ["S11", "S12"],
                 "val_subjects": ["S12"], "crop_shape": [64, 64, 64], "factor": 4},
        "train": {"steps": 4, "log_every": 2, "checkpoint_every": 2, "log_grad_norms": True}})
    train(config, tmp_path / "run", verbose=0)
    import csv
    with open(tmp_path / "run" / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(r["step"])) for r in rows] == [2, 4]
    for term in ("gan", "sim", "cyc", "smooth", "trans", "anatomy_cyc", "diff_cyc"):
        assert float(rows[-1][f"grad_{term}"]) > 0.0, term
    assert float(rows[-1]["field_magnitude"]) > 0.0
    assert float(rows[-1]["discriminator"]) > 0.0


# ----------------------------------------------------------------------------- init_from

@pytest.mark.slow
def test_init_from_starts_forward_generator_from_another_run(lpba40_root, tmp_path):
    def config(preset, steps, **train_options):
        return config_from_dict({
            "name": preset, "preset": preset, "weights": {"gan": 0.0} if preset == "ltnet" else {},
            "data": {"root": str(lpba40_root), "atlas": "S11", "train_subjects": ["S11", "S12"],
                     "val_subjects": ["S12"], "crop_shape": [64, 64, 64], "factor": 4},
            "train": dict({"steps": steps, "log_every": 2, "checkpoint_every": 2},
                          **train_options)})
    source = train(config("voxelmorph", 2), tmp_path / "vm", verbose=0)
    started = train(config("ltnet", 0, init_from=str(tmp_path / "vm")), tmp_path / "lt",
                    verbose=0)
    for ours, theirs in zip(started.model.forward_generator.weights,
                            source.model.forward_generator.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    fresh = build_model(config("ltnet", 0), started.data.atlas.image.shape)
    assert not same(values(fresh.forward_generator.weights), started.model.forward_generator.weights)
    # Another atlas: the source's field would mean something else here.
    other = config("ltnet", 0, init_from=str(tmp_path / "vm"))
    other = dataclasses.replace(other, data=dataclasses.replace(other.data, atlas="S12"))
    with pytest.raises(ValueError, match="atlas S11 != S12"):
        train(other, tmp_path / "lt_other", verbose=0)
    assert not (tmp_path / "lt_other").exists(), "a refused run left a run directory"
    with pytest.raises(FileNotFoundError, match="missing"):
        train(config("ltnet", 0, init_from=str(tmp_path / "nowhere")), tmp_path / "lt3",
              verbose=0)


# ----------------------------------------------------------------------------- folding

def linear_field(shape, coefficient):
    """u_x = coefficient * x: det J = 1 + coefficient everywhere."""
    field = np.zeros(shape + (3,))
    field[..., 0] = coefficient * np.arange(shape[0])[:, None, None]
    return field


def test_folding_of_analytic_fields():
    stats = evaluation.folding_stats(linear_field((8, 6, 5), 0.5))
    assert stats == {"folding_percent": 0.0, "log_jacobian_std": pytest.approx(0.0, abs=1e-12)}
    np.testing.assert_allclose(evaluation.jacobian_determinant(linear_field((8, 6, 5), -0.25)),
                               0.75)
    assert evaluation.folding_stats(linear_field((8, 6, 5), -2.0))["folding_percent"] == 100.0
    # u_x = a x^2: det J = 1 + 2 a x; a = -0.05 on x = 0..31 folds where x >= 10 (22 of 32).
    quadratic = np.zeros((32, 4, 4, 3))
    x = np.arange(32.0)
    quadratic[..., 0] = -0.05 * x[:, None, None] ** 2
    np.testing.assert_allclose(evaluation.jacobian_determinant(quadratic)[:, 0, 0], 1 - 0.1 * x,
                               atol=1e-12)
    assert evaluation.folding_stats(quadratic)["folding_percent"] == pytest.approx(100 * 22 / 32)
    # u_y = c(x) y with c = 1, then -0.5: det J = 1 + c = 2 or 0.5 in equal halves (d/dy is
    # exact for a linear field), so log|J| = +-log 2 and its std is log 2.
    halves = np.zeros((40, 4, 4, 3))
    halves[..., 1] = np.where(np.arange(40)[:, None, None] < 20, 1.0, -0.5) \
        * np.arange(4)[None, :, None]
    assert evaluation.folding_stats(halves)["log_jacobian_std"] == pytest.approx(math.log(2),
                                                                                 rel=1e-6)


def test_folding_columns_round_trip_through_csv(tmp_path):
    scores = [evaluation.SubjectScores("s1", {1: 0.5}, {"a": 0.5},
                                       {"folding_percent": 1.5, "log_jacobian_std": 0.25})]
    evaluation.write_scores_csv(scores, tmp_path / "s.csv")
    back = evaluation.read_scores_csv(tmp_path / "s.csv")
    assert back[0].deformation == {"folding_percent": 1.5, "log_jacobian_std": 0.25}
    summary = evaluation.summarise(back)
    assert summary["folding_percent"] == 1.5
    table = evaluation.format_summary_table({"m": summary})
    assert "Fold %" in table and "1.500" in table


# ----------------------------------------------------------------------------- the search table

def test_describe_changes_and_twins():
    paper = apply_preset(ExperimentConfig(name="paper"), "ltnet")
    assert search.describe_changes(paper) == "none (the paper's Eq. 11)"
    tuned = dataclasses.replace(paper, weights=dataclasses.replace(paper.weights, gan=0.1),
                                penalties=PenaltyConfig(trans_eps=0.5))
    assert search.describe_changes(tuned) == "weights.gan=0.1, penalties.trans_eps=0.5"
    twin = apply_preset(ExperimentConfig(name="vm"), "voxelmorph")
    assert search.is_voxelmorph_twin(twin) and not search.is_voxelmorph_twin(tuned)
    assert search.describe_changes(twin) == "preset voxelmorph"
    rows = [{"setting": "vm", "steps": 500, "dice_mean": 66.0, "is_voxelmorph_twin": True},
            {"setting": "a", "steps": 500, "dice_mean": 67.5, "is_voxelmorph_twin": False},
            {"setting": "b", "steps": 1000, "dice_mean": 60.0, "is_voxelmorph_twin": False}]
    joined = search.attach_twins(rows)
    assert joined[1]["twin"] == "vm" and joined[1]["vs_twin"] == pytest.approx(1.5)
    assert "twin" not in joined[2] or not joined[2].get("twin")


def test_weakest_term_is_relative_to_sim():
    row = {"grad_sim": 2.0, "grad_smooth": 1.0, "grad_cyc": 0.05, "sim": -0.5}
    assert search.weakest_term(row) == ("cyc", pytest.approx(0.025))
    assert search.weakest_term({"sim": -0.5})[0] == ""


# ----------------------------------------------------------------------------- reconstruction

@pytest.mark.parametrize("reconstruction, exact", [("composed", True), ("two_warps", False)])
def test_composed_reconstruction_has_no_interpolation_blur(reconstruction, exact):
    """A half-voxel shift and its exact inverse: resampling twice blurs l_bar (and l_bar_s)
    away from l, resampling once through the composed field gives l back."""
    tf.keras.utils.set_random_seed(0)
    model = build_model(ltnet_config(weights={"gan": 0.0},
                                     penalties={"reconstruction": reconstruction}), SHAPE)
    shift = np.zeros((1,) + SHAPE + (3,), np.float32)
    shift[..., 0] = 0.5
    model.forward_generator = lambda inputs, training=False: tf.constant(shift)
    model.backward_generator = lambda inputs, training=False: tf.constant(-shift)
    batch = random_batch()
    cycle = model.correspondence_cycle(batch["atlas"], batch["atlas_labels"], batch["target"])
    inside = (0, slice(2, -2), slice(2, -2), slice(2, -2))
    image_error = np.abs(cycle["reconstructed_atlas"].numpy() - batch["atlas"].numpy())[inside]
    label_error = np.abs(cycle["reconstructed_atlas_labels"].numpy()
                         - batch["atlas_labels"].numpy())[inside]
    if exact:
        assert image_error.max() < 1e-6 and label_error.max() < 1e-6
    else:
        # two linear resamplings average neighbours: about a quarter of each step remains
        assert image_error.max() > 0.1 and label_error.max() > 0.2


def test_unknown_reconstruction_is_refused():
    with pytest.raises(ValueError, match="two_warps, composed"):
        config_from_dict({"penalties": {"reconstruction": "once"}})


def test_resampled_real_scans_for_the_discriminator():
    """Off: D's real input is the scan itself. On: one linear resampling at a sub-voxel shift,
    which averages neighbours and so lowers a noise image's total variation."""
    tf.keras.utils.set_random_seed(0)
    target = random_batch()["target"]
    plain = build_model(ltnet_config(), SHAPE)
    assert plain._real_for_discriminator(target) is target
    model = build_model(ltnet_config(discriminator_resample_real=True), SHAPE)
    resampled = model._real_for_discriminator(target).numpy()

    def variation(image):
        return sum(np.abs(np.diff(image, axis=a)).mean() for a in (1, 2, 3))
    assert resampled.shape == target.shape
    assert variation(resampled) < 0.95 * variation(target.numpy())
    assert abs(resampled.mean() - float(tf.reduce_mean(target))) < 0.02


# ----------------------------------------------------------------------------- symmetric extension

def test_inverse_terms_by_hand_and_on_both_generators():
    """inverse_sim = -NCC(atlas, u warped by G_B(u, atlas)); inverse_trans = Eq. (8) with that
    field; both straightforward and fast paths agree; inverse_trans reaches G_F, inverse_sim
    does not; the paper's presets leave both off (no extra G_B pass)."""
    import voxelmorph as vxm
    tf.keras.utils.set_random_seed(0)
    weights = {"gan": 0.0, "inverse_sim": 1.0, "inverse_trans": 0.5}
    fast = build_model(ltnet_config(weights=weights), SHAPE)
    slow = build_model(ltnet_config(weights=weights), SHAPE, fast_path=False)
    slow.set_weights(fast.get_weights())
    batch = random_batch()
    atlas, labels, target = batch["atlas"], batch["atlas_labels"], batch["target"]

    direct = fast.backward_generator([target, atlas])
    forward = fast.forward_generator([atlas, target])
    warped_target = vxm.layers.SpatialTransformer(indexing="ij")([target, direct])
    expected_sim = -losses.local_ncc(atlas, warped_target).numpy()
    expected_trans = losses.transformation_consistency_loss(forward, direct, 0.001, 0.45).numpy()
    for model in (fast, slow):
        terms = model.generator_terms(model.correspondence_cycle(atlas, labels, target),
                                      atlas, labels, target)
        assert terms["inverse_sim"].numpy() == pytest.approx(expected_sim, rel=1e-4)
        assert terms["inverse_trans"].numpy() == pytest.approx(expected_trans, rel=1e-4)

    norms = fast.field_gradient_norms(atlas, labels, target)
    assert float(norms["grad_inverse_trans"]) > 0.0
    assert float(norms["grad_inverse_sim"]) == 0.0   # a G_B-only term

    paper = build_model(ltnet_config(weights={"gan": 0.0}), SHAPE)
    assert "direct_backward_field" not in paper.correspondence_cycle(atlas, labels, target)
    assert set(losses.EQ11_WEIGHTS) == {"gan", "sim", "cyc", "smooth", "trans", "anatomy_cyc",
                                        "diff_cyc"}
