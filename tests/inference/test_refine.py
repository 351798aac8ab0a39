"""Test-time refinement of the forward field (ltnet_keras.inference.refine): the written-out
gradients against autodiff of the project's reference implementations, the folding fraction
on a hand-made fold, settings validation, and refinement on a synthetic pair with a known
shift (tiny grids: a few seconds, most of it XLA compilation)."""
import ltnet_keras  # noqa: F401  (before TensorFlow)
import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift

from ltnet_keras import losses
from ltnet_keras.inference import refine as R
from ltnet_keras.models import trilinear

RNG = np.random.default_rng(0)
SHAPE = (9, 10, 11)


def _random(*shape, scale=1.0):
    return tf.constant((RNG.normal(size=shape) * scale).astype(np.float32))


def _channels_last(field):
    return tf.transpose(field, [1, 2, 3, 0])[None]


def test_warp_matches_trilinear_value_and_gradient():
    volume, field, upstream = _random(*SHAPE), _random(3, *SHAPE, scale=1.5), _random(*SHAPE)
    warped, derivative = R.warp_and_derivative(R.corner_table(volume), field)
    moved = _channels_last(field)
    with tf.GradientTape() as tape:
        tape.watch(moved)
        reference = trilinear.warp(volume[None, ..., None], moved)[0, ..., 0]
        total = tf.reduce_sum(reference * upstream)
    expected = tf.transpose(tape.gradient(total, moved)[0], [3, 0, 1, 2])
    np.testing.assert_allclose(warped, reference, atol=1e-5)
    np.testing.assert_allclose(upstream[None] * derivative, expected, atol=1e-5)


def test_ncc_matches_project_loss_and_its_gradient():
    target, warped = tf.abs(_random(*SHAPE)), tf.abs(_random(*SHAPE))
    value, gradient = R.ncc_and_gradient(target, warped, 5)
    with tf.GradientTape() as tape:
        tape.watch(warped)
        reference = losses.local_ncc(target[None, ..., None], warped[None, ..., None], 5)[0]
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    np.testing.assert_allclose(gradient, tape.gradient(reference, warped), atol=1e-7)


def test_diffusion_matches_smoothness_loss_and_its_gradient():
    field = _random(3, *SHAPE)
    value, gradient = R.diffusion_and_gradient(field)
    with tf.GradientTape() as tape:
        tape.watch(field)
        reference = losses.smoothness_loss(_channels_last(field))[0]
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    np.testing.assert_allclose(gradient, tape.gradient(reference, field), atol=1e-7)


def test_smoothing_is_repeated_3_box_mean_and_transpose_is_its_gradient():
    field, upstream = _random(3, *SHAPE), _random(3, *SHAPE)
    reference = _channels_last(field)
    for _ in range(2):
        for axis in range(3):
            size = [1] * 5
            size[axis + 1] = 3
            reference = tf.nn.avg_pool3d(reference, size, [1] * 5, "SAME")
    with tf.GradientTape() as tape:
        tape.watch(field)
        total = tf.reduce_sum(R.smooth(field, 2) * upstream)
    np.testing.assert_allclose(_channels_last(R.smooth(field, 2)), reference, atol=1e-5)
    np.testing.assert_allclose(R.smooth_transpose(upstream, 2), tape.gradient(total, field),
                               atol=1e-5)


def test_folding_fraction_of_a_hand_made_fold():
    field = np.zeros((10, 10, 10, 3), np.float32)
    assert R.folding_fraction(field) == 0.0
    # u_x = 2, 0, -2 on the planes x = 3, 4, 5 (0 elsewhere): by central differences
    # d(x + u_x)/dx = 1 + (u(x + 1) - u(x - 1)) / 2 is 1 - 2 = -1 on the plane x = 4 (it
    # folds), 1 on x = 3 and 5, 2 on x = 2 and 6: one plane of ten folds.
    x = np.arange(10, dtype=np.float32)
    field[..., 0] = np.where((x >= 3) & (x <= 5), -2.0 * (x - 4), 0.0)[:, None, None]
    expected = 0.1
    assert R.folding_fraction(field) == pytest.approx(expected)


def test_folding_fraction_counts_the_voxels_numpy_determinants_count():
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(3)
    field = gaussian_filter(rng.normal(size=(20, 22, 18, 3)), (1, 1, 1, 0)) * 6.0
    jacobian = np.stack([np.stack(np.gradient(field[..., i], axis=(0, 1, 2)), -1)
                         for i in range(3)], -2) + np.eye(3)
    folds = np.linalg.det(jacobian) <= 0.0
    assert 0.05 < folds.mean() < 0.5
    assert R.folding_fraction(field) == folds.mean()


@pytest.mark.parametrize("changes, words", [
    ({"levels": ((3, 10),)}, ["1, 2, 4, 8"]),
    ({"levels": ((2, 10), (4, 10))}, ["coarse to fine"]),
    ({"levels": ((4, -1),)}, ["0..1000"]),
    ({"levels": ()}, ["at least one"]),
    ({"learning_rate": 0.0}, ["learning_rate", "> 0"]),
    ({"smoothing_passes": 1.5}, ["smoothing_passes", "0..12"]),
    ({"ncc_window": 2}, ["ncc_window", ">= 3"]),
    ({"diffeomorphic": "yes"}, ["True or False"]),
])
def test_bad_settings_name_the_valid_values(changes, words):
    with pytest.raises(ValueError) as error:
        R.RefineSettings(**changes)
    for word in words:
        assert word in str(error.value)


def test_level_window_and_field_resampling():
    assert [R.level_window(9, f) for f in (1, 2, 4, 8)] == [9, 5, 3, 3]
    constant = np.ones((4, 4, 4, 3), np.float32)
    resampled = R.resample_field(constant, 4, 2, (8, 8, 8)).numpy()
    np.testing.assert_allclose(resampled, 2.0)   # 1 voxel of 4 mm = 2 voxels of 2 mm
    with pytest.raises(ValueError, match="do not divide"):
        R.refine_field(np.zeros((12, 12, 12)), np.zeros((12, 12, 12)),
                       np.zeros((3, 3, 3, 3)), R.RefineSettings(levels=((8, 1),)))


def _textured_pair(shift):
    """A smooth random texture in a ball (atlas) and the same moved so that
    ``target(x) = atlas(x + shift)``, on a 32^3 crop."""
    texture = gaussian_filter(RNG.random((32, 32, 32)), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    grid = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"), -1)
    ball = (np.linalg.norm(grid - 15.5, axis=-1) < 12).astype(np.float64)
    atlas = gaussian_filter(ball, 1.0) * (0.3 + texture)
    target = nd_shift(atlas, -np.asarray(shift), order=1, mode="nearest")
    return atlas.astype(np.float32), target.astype(np.float32), ball > 0


def test_refinement_recovers_a_known_shift_and_lowers_its_loss():
    shift = np.array([1.5, -1.0, 0.5])                     # crop voxels (1 mm)
    atlas, target, inside = _textured_pair(shift)
    settings = R.RefineSettings(levels=((4, 40), (2, 40)), learning_rate=0.1,
                                regularizer_weight=0.1, smoothing_passes=2)
    result = R.refine_field(atlas, target, np.zeros((8, 8, 8, 3), np.float32), settings)
    assert result.factor == 2 and result.field.shape == (16, 16, 16, 3)
    assert result.steps_per_level == (40, 40)
    # Each level lowers its own loss (the levels' losses are on different grids).
    assert result.loss_history[0][-1] < result.loss_history[0][0] - 0.02
    assert result.final_loss < result.loss_history[1][0]
    assert result.folding_fraction == 0.0
    # The field in crop voxels (x factor), averaged inside the ball, is the shift.
    core = inside[1::2, 1::2, 1::2]
    recovered = (result.field * result.factor)[core].mean(axis=0)
    print(recovered, result.loss_history[0][[0, -1]], result.loss_history[1][[0, -1]],
          result.final_loss)
    np.testing.assert_allclose(recovered, shift, atol=0.25)


def test_early_stop_runs_fewer_steps():
    atlas, target, _ = _textured_pair([1.0, 0.0, 0.0])
    settings = R.RefineSettings(levels=((4, 200),), tolerance=0.5, patience=5)
    result = R.refine_field(atlas, target, np.zeros((8, 8, 8, 3), np.float32), settings)
    assert 5 < result.steps_per_level[0] < 200


def test_diffeomorphic_integration_and_its_gradient_match_autodiff():
    velocity, upstream = _random(3, 6, 7, 8, scale=0.8), _random(3, 6, 7, 8)
    field, fields = R._integrate(velocity, 3)
    with tf.GradientTape() as tape:
        tape.watch(velocity)
        reference = R.integrate_velocity(velocity, 3)
        total = tf.reduce_sum(reference * upstream)
    np.testing.assert_allclose(field, reference, atol=1e-5)
    np.testing.assert_allclose(R._integrate_vjp(fields, upstream, 3),
                               tape.gradient(total, velocity), atol=1e-4)
