"""LT-Net's objective at test time (ltnet_keras.inference.refine_cycle): the cell sampling
against the trilinear warp, Eq. 9-10 from corner labels against the training losses on
warped one-hot maps, every written-out gradient of the pair objective against autodiff of a
straightforward reference, and the joint refinement on a pair with a known shift."""
from dataclasses import replace

import ltnet_keras  # noqa: F401  (before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift

from ltnet_keras import losses
from ltnet_keras.inference import refine as R
from ltnet_keras.inference import refine_cycle as C
from ltnet_keras.models import trilinear

RNG = np.random.default_rng(1)
SHAPE = (8, 9, 10)


def _smooth_image(seed):
    image = gaussian_filter(np.random.default_rng(seed).normal(size=SHAPE), 1.5)
    return (image / image.std()).astype(np.float32)


def _field(scale, seed):
    return tf.constant((np.random.default_rng(seed).normal(size=(3,) + SHAPE) * scale)
                       .astype(np.float32))


def _warp(volume, field):
    """Reference: ``volume`` ``(x, y, z, C)`` at ``p + field`` (``(3, x, y, z)``)."""
    return trilinear.warp(volume[None], tf.transpose(field, [1, 2, 3, 0])[None])[0]


def test_sample_matches_trilinear_warp_and_its_derivative():
    volumes, field = _field(1.0, 0), _field(1.5, 1)
    values, derivatives = C.sample(C.field_tables(volumes), field)
    moved = tf.transpose(field, [1, 2, 3, 0])[None]
    for c in range(3):
        with tf.GradientTape() as tape:
            tape.watch(moved)
            reference = trilinear.warp(volumes[c][None, ..., None], moved)[0, ..., 0]
            total = tf.reduce_sum(reference)
        gradient = tf.transpose(tape.gradient(total, moved)[0], [3, 0, 1, 2])
        np.testing.assert_allclose(values[c], reference, atol=1e-5)
        np.testing.assert_allclose(derivatives[c], gradient, atol=1e-5)
    weights, d_weights = C.corner_weights(C.cells(field))
    corners = tf.gather(R.corner_table(volumes[0]), C.cells(field)[0])
    np.testing.assert_allclose(tf.reduce_sum(weights * corners, -1), values[0], atol=1e-5)
    np.testing.assert_allclose(tf.reduce_sum(d_weights * corners[None], -1), derivatives[0],
                               atol=1e-5)


def test_label_terms_from_corners_match_the_training_losses():
    labels = np.random.default_rng(2).integers(0, 4, size=SHAPE).astype(np.int32)
    one_hot = tf.one_hot(labels, 4)
    forward, round_trip = _field(1.2, 3), _field(1.2, 4)
    table = R.corner_table(tf.constant(labels))
    warped_cell, cycle_cell = C.cells(forward), C.cells(round_trip)
    warped_weights, _ = C.corner_weights(warped_cell)
    cycle_weights, _ = C.corner_weights(cycle_cell)
    warped_labels = tf.gather(table, warped_cell[0])
    cycle_labels = tf.gather(table, cycle_cell[0])
    u_bar, l_bar = _warp(one_hot, forward), _warp(one_hot, round_trip)
    anatomy, _ = C.anatomy_cycle(tf.constant(labels), cycle_labels, cycle_weights)
    np.testing.assert_allclose(anatomy, losses.anatomy_cycle_loss(one_hot[None], l_bar[None])[0],
                               rtol=1e-5)
    difference, _, _ = C.anatomy_difference(tf.constant(labels), warped_labels, warped_weights,
                                            cycle_labels, cycle_weights, 4)
    floor = (C.TRANS_EPSILON ** 2) ** C.TRANS_GAMMA
    reference = losses.anatomy_difference_loss(one_hot[None], u_bar[None], l_bar[None])[0]
    np.testing.assert_allclose(difference + floor, reference, rtol=1e-5)


def _charbonnier(x, epsilon, gamma):
    return tf.reduce_mean(tf.pow(x * x + epsilon ** 2, gamma))


def test_pair_gradients_match_autodiff_of_the_reference_objective():
    """Each field's gradient: autodiff of the terms it enters, the other field held fixed
    where it is sampled (the block scheme of the module docstring)."""
    atlas, target = _smooth_image(5), _smooth_image(6)
    labels = np.digitize(atlas, [-0.5, 0.3, 1.0]).astype(np.int32)
    one_hot = tf.one_hot(labels, 4)
    weights = C.CycleWeights(backward_similarity=0.7, image_cycle=0.9, transformation=1.3,
                             anatomy_cycle=0.6, anatomy_difference=0.8)
    level = C.make_level(atlas, target, labels, 3, 4)
    forward, backward = _field(1.0, 7), _field(1.0, 8)
    loss, gradient_f, gradient_b, _ = C.pair_loss_and_gradients(level, forward, backward,
                                                                weights, 0.5, 0)
    a, t = tf.constant(atlas)[..., None], tf.constant(target)[..., None]
    w = weights.to_dict()

    def side_terms(field, fixed_other, moving, own):
        other = tf.transpose(_warp(tf.transpose(fixed_other, [1, 2, 3, 0]), field), [3, 0, 1, 2])
        residual = field + other
        back = _warp(own, residual)[..., 0]
        return (_warp(moving, field)[..., 0], residual,
                w["transformation"] * _charbonnier(residual, C.TRANS_EPSILON, C.TRANS_GAMMA)
                + w["image_cycle"] * _charbonnier(back - own[..., 0], C.CYCLE_EPSILON,
                                                  C.CYCLE_GAMMA))

    def ncc(fixed, moved):
        return losses.local_ncc(fixed[None], moved[None, ..., None], 3)[0]

    def diffusion(field):
        return losses.smoothness_loss(tf.transpose(field, [1, 2, 3, 0])[None])[0]

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([forward, backward])
        warped_f, _, trip_f = side_terms(forward, tf.stop_gradient(backward), a, t)
        warped_b, residual_b, trip_b = side_terms(backward, tf.stop_gradient(forward), t, a)
        u_bar, l_bar = _warp(one_hot, forward), _warp(one_hot, residual_b)
        anatomy = losses.anatomy_cycle_loss(one_hot[None], l_bar[None])[0]
        floor = (C.TRANS_EPSILON ** 2) ** C.TRANS_GAMMA
        difference_f = losses.anatomy_difference_loss(
            one_hot[None], u_bar[None], tf.stop_gradient(l_bar)[None])[0] - floor
        difference_b = losses.anatomy_difference_loss(
            one_hot[None], tf.stop_gradient(u_bar)[None], l_bar[None])[0] - floor
        total_f = (-ncc(t, warped_f) + 0.5 * diffusion(forward) + trip_f
                   + w["anatomy_difference"] * difference_f)
        total_b = (-w["backward_similarity"] * ncc(a, warped_b) + 0.5 * diffusion(backward)
                   + trip_b + w["anatomy_cycle"] * anatomy + w["anatomy_difference"] * difference_b)
    np.testing.assert_allclose(gradient_f, tape.gradient(total_f, forward), atol=2e-6)
    np.testing.assert_allclose(gradient_b, tape.gradient(total_b, backward), atol=2e-6)
    expected = (-ncc(t, warped_f) - w["backward_similarity"] * ncc(a, warped_b)
                + 0.5 * (diffusion(forward) + diffusion(backward)) + trip_f + trip_b
                + w["anatomy_cycle"] * anatomy + w["anatomy_difference"] * difference_f)
    assert loss == pytest.approx(float(expected), rel=1e-4)


def test_approximate_inverse_undoes_a_smooth_field():
    forward = np.stack([gaussian_filter(RNG.normal(size=(12, 12, 12)), 3) * 20
                        for _ in range(3)], -1).astype(np.float32)
    backward = C.approximate_inverse(forward)
    round_trip = backward + _warp(tf.constant(forward), tf.transpose(backward, [3, 0, 1, 2]))
    inner = (slice(3, -3),) * 3     # away from the clamped borders
    assert np.abs(forward[inner]).mean() > 0.3
    assert np.abs(np.asarray(round_trip)[inner]).mean() < 0.05 * np.abs(forward[inner]).mean()


def test_joint_refinement_recovers_a_shift_and_its_inverse():
    atlas = gaussian_filter(RNG.normal(size=(32, 32, 32)), 2.0).astype(np.float32)
    shift = np.array([1.5, -1.0, 0.5])
    target = nd_shift(atlas, shift, order=1).astype(np.float32)  # target(p) = atlas(p - shift)
    settings = R.RefineSettings(levels=((4, 30), (2, 30)), objective="ltnet",
                                cycle={"image_cycle": 1.0, "transformation": 1.0})
    result = R.refine_field(atlas, target, np.zeros((8, 8, 8, 3), np.float32), settings)
    uncoupled = R.refine_field(atlas, target, np.zeros((8, 8, 8, 3), np.float32), replace(
        settings, cycle={"image_cycle": 0.0, "transformation": 0.0}))
    inner = (slice(4, -4),) * 3
    forward_mm = result.field[inner].reshape(-1, 3).mean(0) * result.factor
    backward_mm = result.backward_field[inner].reshape(-1, 3).mean(0) * result.factor
    np.testing.assert_allclose(forward_mm, -shift, atol=0.3)
    np.testing.assert_allclose(backward_mm, shift, atol=0.3)
    assert result.inverse_consistency_mm < 0.3
    # Eq. 7-8 are what pull the two fields towards inverses of each other.
    assert uncoupled.inverse_consistency_mm > 1.5 * result.inverse_consistency_mm
    assert result.loss_history[-1][-1] < result.loss_history[0][0]


def test_settings_refuse_bad_starts_objectives_and_weights():
    with pytest.raises(ValueError, match="start 'middle'"):
        R.RefineSettings(start="middle")
    with pytest.raises(ValueError, match="objective 'both'"):
        R.RefineSettings(objective="both")
    with pytest.raises(ValueError, match="diffeomorphic"):
        R.RefineSettings(objective="ltnet", diffeomorphic=True)
    with pytest.raises(ValueError, match="transformation"):
        C.CycleWeights(transformation=-1.0)
    settings = R.RefineSettings(objective="ltnet", cycle={"image_cycle": 0.0})
    assert settings.cycle == C.CycleWeights(image_cycle=0.0)
    assert R.RefineSettings(**settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown cycle term"):
        settings.cycle.without("gan")


def test_zero_start_ignores_the_given_field():
    atlas = gaussian_filter(RNG.normal(size=(16, 16, 16)), 2.0).astype(np.float32)
    far = np.full((4, 4, 4, 3), 3.0, np.float32)
    settings = R.RefineSettings(levels=((4, 0),), start="zero")
    result = R.refine_field(atlas, atlas, far, settings)
    np.testing.assert_array_equal(result.field, 0.0)
