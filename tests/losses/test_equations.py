"""Hand-computed values for the LT-Net losses (Eq. (3)-(11)); every loss is per example, (batch,)."""
import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.losses import equations as L

EPS, GAMMA = 0.001, 0.45
RHO0 = EPS ** (2 * GAMMA)  # rho(0) = (0 + eps^2)^gamma = eps^(2 gamma) ~= 0.001995


def rho(x):
    return (np.asarray(x, np.float64) ** 2 + EPS ** 2) ** GAMMA


def t32(a):
    return tf.constant(np.asarray(a, np.float32))


def grid(n=8):
    """Index arrays x, y, z of an n^3 grid, each (n, n, n)."""
    return np.meshgrid(*(np.arange(n, dtype=np.float32),) * 3, indexing="ij")


def field_from(components, n=8):
    """(1, n, n, n, 3) field from three (n, n, n) arrays (or scalars)."""
    shape = (n, n, n)
    return np.stack([np.broadcast_to(np.float32(c), shape) for c in components], -1)[None]


def warp(moving, field):
    import voxelmorph as vxm
    return vxm.layers.SpatialTransformer(interp_method="linear", indexing="ij")(
        [t32(moving), t32(field)]).numpy()


# ------------------------------------------------------------------------------------------------
# Sec. 3: local normalised cross-correlation
# ------------------------------------------------------------------------------------------------

def test_local_ncc_matches_voxelmorph_on_random_intensities():
    import voxelmorph as vxm
    rng = np.random.default_rng(0)
    target = rng.random((2, 8, 8, 8, 1), dtype=np.float32)
    # A prediction partly correlated with the target, and an independent one.
    for prediction in (0.5 * target + 0.5 * rng.random(target.shape, dtype=np.float32),
                       rng.random(target.shape, dtype=np.float32)):
        ours = L.local_ncc(t32(target), t32(prediction)).numpy()
        theirs = -vxm.losses.NCC(win=[9, 9, 9]).loss(t32(target), t32(prediction)).numpy()
        assert ours.shape == (2,)
        np.testing.assert_allclose(ours.mean(), theirs.mean(), atol=1e-4)
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_local_ncc_of_identical_images_is_one():
    # Identical images: cross = var_t = var_p = v, cc = v^2 / (v^2 + 1e-5) ~= 1 wherever v > 0.
    rng = np.random.default_rng(1)
    image = t32(rng.random((1, 8, 8, 8, 1)))
    cc_map = L._local_cc_map(image, image).numpy()
    assert np.all(cc_map > 0.999)
    np.testing.assert_allclose(L.local_ncc(image, image).numpy(), [1.0], atol=1e-3)
    # Scaling one image leaves the correlation unchanged (up to eps).
    np.testing.assert_allclose(L.local_ncc(image, 3.0 * image).numpy(), [1.0], atol=1e-3)


def _pearson_sq(a, b, eps=1e-5):
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return (a * b).sum() ** 2 / ((a * a).sum() * (b * b).sum() + eps)


@pytest.mark.parametrize("case", ["affine", "random", "constant"])
def test_local_cc_at_a_window_away_from_the_border_is_squared_pearson(case):
    # A 3x3x3 window centred on voxel (2, 2, 2) of a 5^3 volume covers voxels 1..3 with no
    # padding, so cc there = (sum dt dp)^2 / (sum dt^2 * sum dp^2 + eps) over those 27 voxels.
    rng = np.random.default_rng(2)
    target = rng.random((1, 5, 5, 5, 1)).astype(np.float32)
    prediction = {"affine": 2.0 * target + 1.0,           # r^2 = 1 (var_t * var_p >> eps)
                  "random": rng.random(target.shape),     # r^2 from numpy
                  "constant": np.ones_like(target)}[case]  # var_p = 0 -> cc = 0 / eps = 0
    cc = L._local_cc_map(t32(target), t32(prediction), window=3).numpy()[0, 2, 2, 2, 0]
    expected = _pearson_sq(target[0, 1:4, 1:4, 1:4, 0], np.asarray(prediction)[0, 1:4, 1:4, 1:4, 0])
    np.testing.assert_allclose(cc, expected, atol=1e-4)
    if case == "affine":
        assert cc == pytest.approx(1.0, abs=1e-4)
    if case == "constant":
        assert cc == pytest.approx(0.0, abs=1e-6)


def test_similarity_loss_is_negative_local_ncc():
    rng = np.random.default_rng(3)
    a, b = t32(rng.random((2, 8, 8, 8, 1))), t32(rng.random((2, 8, 8, 8, 1)))
    np.testing.assert_allclose(L.similarity_loss(a, b).numpy(), -L.local_ncc(a, b).numpy())
    np.testing.assert_allclose(L.similarity_loss(a, a).numpy(), [-1.0, -1.0], atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Eq. (3)/(6): smoothness
# ------------------------------------------------------------------------------------------------

A = 0.7
X3, Y3, _ = grid(3)
SMOOTH_CASES = {
    # Forward differences along x have shape (2, 3, 3) x 3 components = 54 values.
    # All 3 components = a*x: all 54 x-differences are a -> mean a^2; y and z give 0 -> a^2 / 3.
    "linear_x_all_components": ((A * X3, A * X3, A * X3), A ** 2 / 3),
    # Only component 0 = a*x: 18 of the 54 x-differences are a -> a^2/3; averaged over 3 -> a^2/9.
    "linear_x_one_component": ((A * X3, 0, 0), A ** 2 / 9),
    # Component 2 = a*y: same count along y -> a^2 / 9.
    "linear_y_component_2": ((0, 0, A * Y3), A ** 2 / 9),
    # Component 0 = x^2: x-differences 1 (x 0->1) and 3 (x 1->2), each on 9 (y, z) positions:
    # (9*1 + 9*9) / 54 = 90/54 = 5/3; divided by 3 directions -> 5/9.
    "quadratic_x": ((X3 ** 2, 0, 0), 5 / 9),
    "constant": ((1.5, -2.0, 0.25), 0.0),
}


@pytest.mark.parametrize("name", sorted(SMOOTH_CASES))
def test_smoothness_hand_values(name):
    components, expected = SMOOTH_CASES[name]
    field = field_from(components, n=3)
    # A second example in the batch (zero field) must stay independent: (batch,) output.
    batch = np.concatenate([field, np.zeros_like(field)])
    value = L.smoothness_loss(t32(batch)).numpy()
    assert value.shape == (2,)
    np.testing.assert_allclose(value, [expected, 0.0], rtol=1e-5, atol=1e-7)


def test_smoothness_gradient_hand_values():
    """Component 0 = a*x on a 3^3 grid: L = (1/3) * mean of the 54 squared x-differences
    (18 of them a), so dL/dfield = (1/3) (2/54) (d_before - d_after): -2a/162 at x = 0, 0 at
    x = 1, +2a/162 at x = 2, on component 0 only."""
    field = tf.Variable(t32(field_from((A * X3, 0, 0), n=3)))
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(L.smoothness_loss(field))
    gradient = tape.gradient(value, field).numpy()[0]
    expected = np.zeros_like(gradient)
    expected[0, :, :, 0], expected[2, :, :, 0] = -2 * A / 162, 2 * A / 162
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-8)


def test_smoothness_matches_voxelmorph_grad_l2():
    import voxelmorph as vxm
    field = t32(np.random.default_rng(4).normal(size=(2, 4, 5, 6, 3)))
    np.testing.assert_allclose(L.smoothness_loss(field).numpy(),
                               vxm.losses.Grad("l2").loss(None, field).numpy(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Eq. (4): LSGAN
# ------------------------------------------------------------------------------------------------

# Score maps (batch 2, a 1x1x2 patch map): example 0 real (1, 0.5) fake (0, 0.5);
# example 1 real (0, 1) fake (1, 0).
REAL = np.array([[1.0, 0.5], [0.0, 1.0]], np.float32).reshape(2, 1, 1, 2, 1)
FAKE = np.array([[0.0, 0.5], [1.0, 0.0]], np.float32).reshape(2, 1, 1, 2, 1)


def test_lsgan_discriminator_hand_values():
    # ex 0: mean((1-1)^2, (0.5-1)^2) = 0.125; mean(0^2, 0.5^2) = 0.125 -> 0.5 * 0.25 = 0.125
    # ex 1: mean((0-1)^2, (1-1)^2) = 0.5;     mean(1^2, 0^2) = 0.5     -> 0.5 * 1.0  = 0.5
    np.testing.assert_allclose(L.lsgan_discriminator_loss(t32(REAL), t32(FAKE)).numpy(),
                               [0.125, 0.5], rtol=1e-6)


def test_lsgan_generator_hand_values():
    # ex 0: mean((0-1)^2, (0.5-1)^2) = (1 + 0.25)/2 = 0.625; ex 1: mean((1-1)^2, (0-1)^2) = 0.5
    np.testing.assert_allclose(L.lsgan_generator_loss(t32(FAKE)).numpy(), [0.625, 0.5], rtol=1e-6)


def test_lsgan_targets_real_one_fake_zero():
    ones, zeros = tf.ones((1, 2, 2, 2, 1)), tf.zeros((1, 2, 2, 2, 1))
    # A perfect discriminator (real -> 1, fake -> 0) has zero loss and the generator loss 1;
    # a fooled one (fake -> 1) costs the generator nothing.
    np.testing.assert_allclose(L.lsgan_discriminator_loss(ones, zeros).numpy(), [0.0])
    np.testing.assert_allclose(L.lsgan_generator_loss(zeros).numpy(), [1.0])
    np.testing.assert_allclose(L.lsgan_generator_loss(ones).numpy(), [0.0])
    # Swapped labels: 0.5 * (1 + 1) = 1.
    np.testing.assert_allclose(L.lsgan_discriminator_loss(zeros, ones).numpy(), [1.0])


# ------------------------------------------------------------------------------------------------
# Eq. (7): image cycle
# ------------------------------------------------------------------------------------------------

def test_image_cycle_hand_values():
    atlas = np.array([[0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 1.0, 1.0]], np.float32).reshape(2, 1, 2, 2, 1)
    recon = np.array([[0.5, 0.0, 0.5, 0.75], [1.0, 1.0, 1.0, 1.0]], np.float32).reshape(2, 1, 2, 2, 1)
    # ex 0: |0.5| + |-1| + 0 + |0.5| = 2 over 4 voxels = 0.5; ex 1: identical -> 0.
    np.testing.assert_allclose(L.image_cycle_loss(t32(atlas), t32(recon)).numpy(), [0.5, 0.0])


# ------------------------------------------------------------------------------------------------
# Eq. (8): Charbonnier, composition, transformation consistency
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x, eps, gamma, expected", [
    (0.0, EPS, GAMMA, 0.001 ** 0.9),                # (0 + 1e-6)^0.45 = 1e-3^0.9 ~= 0.0019953
    (1.0, EPS, GAMMA, (1.0 + 1e-6) ** 0.45),        # ~= 1.00000045
    (-2.0, EPS, GAMMA, (4.0 + 1e-6) ** 0.45),       # ~= 1.8661
    (3.0, 4.0, 0.5, 5.0),                           # sqrt(9 + 16) = 5
])
def test_charbonnier_hand_values(x, eps, gamma, expected):
    value = L.charbonnier(tf.constant([[x]]), eps=eps, gamma=gamma).numpy()
    assert value.shape == (1, 1)
    assert value[0, 0] == pytest.approx(expected, rel=1e-5)


def test_compose_constant_inner_with_linear_outer():
    # inner = (1, 0, 0) everywhere; outer = (0.5 x, 0, 0).
    # compose(t) = inner(t) + outer(t + inner(t)) = 1 + 0.5 (x + 1) along component 0:
    # x = 0..6 -> 1.5, 2.0, ..., 4.5; at x = 7 the sample x = 8 is off the grid and voxelmorph
    # takes the nearest border value outer(7) = 3.5 -> 4.5 again.
    x, _, _ = grid(8)
    composed = L.compose_fields(t32(field_from((1.0, 0, 0))),
                                t32(field_from((0.5 * x, 0, 0)))).numpy()
    expected_x = np.array([1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 4.5], np.float32)
    np.testing.assert_allclose(composed[0, ..., 0],
                               np.broadcast_to(expected_x[:, None, None], (8, 8, 8)), atol=1e-5)
    np.testing.assert_allclose(composed[0, ..., 1:], 0.0, atol=1e-6)
    # The other order: outer(t) + inner(t + outer(t)) = 0.5 x + 1 -- a different field.
    swapped = L.compose_fields(t32(field_from((0.5 * x, 0, 0))),
                               t32(field_from((1.0, 0, 0)))).numpy()
    np.testing.assert_allclose(swapped[0, ..., 0], 0.5 * x + 1.0, atol=1e-5)


def test_compose_equals_sequential_warps():
    # warp(warp(m, outer), inner) == warp(m, compose(inner, outer)) for the pull convention.
    # m is linear and the warps are linear-interpolated, so this is exact away from borders.
    x, y, z = grid(8)
    moving = (x + 2 * y + 3 * z)[None, ..., None]
    inner = field_from((0.5, 0.0, -0.25))
    outer = field_from((0.1 * (x - 3.5), -0.2 * (y - 3.5), 0.3))
    sequential = warp(warp(moving, outer), inner)
    direct = warp(moving, L.compose_fields(t32(inner), t32(outer)).numpy())
    # w1 = warp(m, outer) is exact where s + outer(s) stays on the grid: x = 1..6 (0.1 (x-3.5)
    # pushes x = 0 and 7 off), all y, z = 0..6 (z + 0.3). The second warp reads w1 at
    # (x + 0.5, y, z - 0.25), i.e. at voxels x..x+1 and z-1..z: exact for x = 1..5, z = 1..6.
    inside = (slice(None), slice(1, 6), slice(None), slice(1, 7))
    np.testing.assert_allclose(sequential[inside], direct[inside], atol=1e-4)


INTERIOR = (slice(None), slice(2, 6), slice(2, 6), slice(2, 6))


@pytest.mark.parametrize("shift", [1.0, 1.5, -0.75, 2.25])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_trans_loss_of_inverse_translations_is_rho0(shift, axis):
    forward = np.zeros((1, 8, 8, 8, 3), np.float32)
    forward[..., axis] = shift
    backward = -forward
    # dp_F(t) + dp_B(t + dp_F(t)) = s + (-s) = 0 -> rho(0) at every voxel and component.
    composed = L.compose_fields(t32(forward), t32(backward)).numpy()
    np.testing.assert_allclose(composed[INTERIOR], 0.0, atol=1e-6)
    np.testing.assert_allclose(L.charbonnier(composed).numpy()[INTERIOR], RHO0, rtol=1e-4)
    np.testing.assert_allclose(
        L.transformation_consistency_loss(t32(forward), t32(backward)).numpy(), [RHO0], rtol=1e-4)
    # Same direction twice: the round trip is off by 2s along `axis`, 0 along the other two:
    # per voxel mean over components = (rho(2s) + 2 rho(0)) / 3, clearly larger.
    same = L.transformation_consistency_loss(t32(forward), t32(forward)).numpy()
    expected = (rho(2 * shift) + 2 * RHO0) / 3
    np.testing.assert_allclose(same, [expected], rtol=1e-4)
    assert same[0] > 100 * RHO0
    composed_same = L.compose_fields(t32(forward), t32(forward)).numpy()
    np.testing.assert_allclose(composed_same[INTERIOR][..., axis], 2 * shift, atol=1e-5)


def test_trans_loss_of_inverse_linear_maps_is_rho0():
    # dp_F(x) = a (x - c) with a = -0.2, c = 3.5 moves x to x' = c + 0.8 (x - c) (inside the grid).
    # Its inverse: x = c + (x' - c) / 0.8, so dp_B(x') = (1/0.8 - 1)(x' - c) = 0.25 (x' - c).
    # dp_F(x) + dp_B(x + dp_F(x)) = -0.2 (x - c) + 0.25 * 0.8 (x - c) = 0 at every voxel, sampled
    # at non-integer positions (exact for linear interpolation of a linear field).
    x, y, z = grid(8)
    forward = field_from((-0.2 * (x - 3.5), -0.2 * (y - 3.5), 0.0))
    backward = field_from((0.25 * (x - 3.5), 0.25 * (y - 3.5), 0.0))
    composed = L.compose_fields(t32(forward), t32(backward)).numpy()
    np.testing.assert_allclose(composed, 0.0, atol=1e-5)
    np.testing.assert_allclose(
        L.transformation_consistency_loss(t32(forward), t32(backward)).numpy(), [RHO0], rtol=1e-3)
    # The order l_bar uses, dp_B(s) + dp_F(s + dp_B(s)) = 0.25 (x-c) - 0.2 * 1.25 (x-c) = 0,
    # also vanishes where s + dp_B(s) stays on the grid (|x - c| <= 2.8, i.e. x = 1..6).
    other = L.compose_fields(t32(backward), t32(forward)).numpy()
    np.testing.assert_allclose(other[:, 1:7, 1:7], 0.0, atol=1e-5)


def test_trans_loss_is_per_example_and_differentiable():
    forward = np.zeros((2, 8, 8, 8, 3), np.float32)
    forward[..., 0] = 1.0
    backward = np.zeros_like(forward)
    backward[0, ..., 0] = -1.0   # example 0: exact inverse
    backward[1, ..., 0] = 1.0    # example 1: off by 2
    f, b = tf.Variable(forward), tf.Variable(backward)
    with tf.GradientTape() as tape:
        loss = L.transformation_consistency_loss(f, b)
        total = tf.reduce_sum(loss)
    np.testing.assert_allclose(loss.numpy(), [RHO0, (rho(2.0) + 2 * RHO0) / 3], rtol=1e-4)
    grads = tape.gradient(total, [f, b])
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    # d rho / d x = 2 gamma x (x^2 + eps^2)^(gamma-1) > 0 at x = 2, so pushing dp_B down helps.
    assert grads[1].numpy()[1, 4, 4, 4, 0] > 0


# ------------------------------------------------------------------------------------------------
# Eq. (9), (10): label space
# ------------------------------------------------------------------------------------------------

# Two voxels, three channels (channel 0 = background), shape (1, 2, 1, 1, 3).
LS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32).reshape(1, 2, 1, 1, 3)
LS_BAR = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]], np.float32).reshape(1, 2, 1, 1, 3)


@pytest.mark.parametrize("exclude_background, expected", [
    # Channels 1-2: sum l*lbar = 0*0.5 + 1*0.5 = 0.5; sum l^2 = 1;
    # sum lbar^2 = 0.25 + 0.25 + 0.25 = 0.75 -> 1 - 2*0.5/1.75 = 1 - 4/7 = 3/7.
    (True, 3 / 7),
    # Adding channel 0: products +0.5 -> 1.0; l^2 +1 -> 2; lbar^2 +0.25 -> 1.0 -> 1 - 2/3 = 1/3.
    (False, 1 / 3),
])
def test_anatomy_cycle_hand_values(exclude_background, expected):
    value = L.anatomy_cycle_loss(t32(LS), t32(LS_BAR), exclude_background=exclude_background)
    np.testing.assert_allclose(value.numpy(), [expected], rtol=1e-6)


def test_anatomy_cycle_extremes_per_example():
    empty = np.zeros_like(LS)
    empty[..., 0] = 1.0                                       # background only
    disjoint = np.array([[0, 0, 1], [0, 0, 1]], np.float32).reshape(LS.shape)
    truth = np.concatenate([LS, LS, empty])
    pred = np.concatenate([LS, disjoint, empty])
    # identical -> 0; no overlap -> 1 - 0 = 1; both without structures -> 0 (identical), no NaN.
    truth_t, pred_t = t32(truth), tf.Variable(pred)
    with tf.GradientTape() as tape:
        value = L.anatomy_cycle_loss(truth_t, pred_t)
        total = tf.reduce_sum(value)
    np.testing.assert_allclose(value.numpy(), [0.0, 1.0, 0.0], atol=1e-6)
    gradient = tape.gradient(total, pred_t).numpy()
    assert np.all(np.isfinite(gradient))
    # Background is excluded, so channel 0 gets no gradient.
    np.testing.assert_array_equal(gradient[..., 0], 0.0)


def test_anatomy_difference_hand_values():
    # Two voxels x two channels, shape (1, 2, 1, 1, 2).
    l_s = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32).reshape(1, 2, 1, 1, 2)
    u_bar = np.array([[0.6, 0.4], [0.0, 1.0]], np.float32).reshape(1, 2, 1, 1, 2)
    l_bar = np.array([[0.9, 0.1], [0.5, 0.5]], np.float32).reshape(1, 2, 1, 1, 2)
    # voxel 0: |l - u| = (0.4, 0.4), |u - lbar| = (0.3, 0.3) -> (0.1, 0.1)
    # voxel 1: |l - u| = (0, 0),     |u - lbar| = (0.5, 0.5) -> (-0.5, -0.5)
    # mean over 4 values = (2 rho(0.1) + 2 rho(-0.5)) / 4
    expected = (rho(0.1) + rho(0.5)) / 2
    value = L.anatomy_difference_loss(t32(l_s), t32(u_bar), t32(l_bar)).numpy()
    np.testing.assert_allclose(value, [expected], rtol=1e-5)
    # Everything identical -> rho(0).
    np.testing.assert_allclose(L.anatomy_difference_loss(t32(l_s), t32(l_s), t32(l_s)).numpy(),
                               [RHO0], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Eq. (11): total
# ------------------------------------------------------------------------------------------------

TERMS = {"gan": [0.5, 1.0], "sim": [-0.8, -0.6], "cyc": [0.1, 0.2], "smooth": [0.01, 0.02],
         "trans": [0.02, 0.0], "anatomy_cyc": [0.3, 0.4], "diff_cyc": [0.05, 0.1]}


def test_eq11_weights():
    assert L.EQ11_WEIGHTS == {"gan": 1, "sim": 1, "cyc": 10, "smooth": 3, "trans": 3,
                              "anatomy_cyc": 3, "diff_cyc": 3}


def test_total_generator_loss_eq11_by_hand():
    terms = {k: t32(v) for k, v in TERMS.items()}
    # ex 0: 0.5 - 0.8 + 10*0.1 + 3*(0.3 + 0.01 + 0.02 + 0.05) = -0.3 + 1.0 + 1.14 = 1.84
    # ex 1: 1.0 - 0.6 + 10*0.2 + 3*(0.4 + 0.02 + 0.0 + 0.1)  =  0.4 + 2.0 + 1.56 = 3.96
    value = L.total_generator_loss(terms, L.EQ11_WEIGHTS).numpy()
    np.testing.assert_allclose(value, [1.84, 3.96], rtol=1e-6)


def test_total_generator_loss_skips_zero_and_absent_weights():
    # Only sim (1) and cyc (10) weighted; gan weight 0; the rest absent (and 'trans' not even
    # computed): ex 0: -0.8 + 10*0.1 = 0.2; ex 1: -0.6 + 10*0.2 = 1.4.
    terms = {k: t32(v) for k, v in TERMS.items() if k != "trans"}
    value = L.total_generator_loss(terms, {"gan": np.float32(0.0), "sim": 1.0, "cyc": 10.0}).numpy()
    np.testing.assert_allclose(value, [0.2, 1.4], rtol=1e-6)


@pytest.mark.parametrize("terms, weights", [
    ({"sim": [1.0], "bogus": [1.0]}, {"sim": 1.0}),
    ({"sim": [1.0]}, {"sim": 1.0, "smoothness": 3.0}),
])
def test_total_generator_loss_unknown_name_raises(terms, weights):
    with pytest.raises(ValueError) as info:
        L.total_generator_loss({k: t32(v) for k, v in terms.items()}, weights)
    for name in L.TERM_NAMES:
        assert name in str(info.value)


def test_total_generator_loss_missing_weighted_term_raises():
    with pytest.raises(ValueError, match="'cyc'"):
        L.total_generator_loss({"sim": t32([1.0])}, {"sim": 1.0, "cyc": 10.0})
    with pytest.raises(ValueError):
        L.total_generator_loss({"sim": t32([1.0])}, {"sim": 0.0})


# ------------------------------------------------------------------------------------------------
# tf.function / tf.distribute
# ------------------------------------------------------------------------------------------------

def _all_losses(image_a, image_b, field_f, field_b, labels_a, labels_b, labels_c, scores):
    terms = {
        "sim": L.similarity_loss(image_a, image_b),
        "smooth": L.smoothness_loss(field_f) + L.smoothness_loss(field_b),
        "gan": L.lsgan_generator_loss(scores),
        "cyc": L.image_cycle_loss(image_a, image_b),
        "trans": L.transformation_consistency_loss(field_f, field_b),
        "anatomy_cyc": L.anatomy_cycle_loss(labels_a, labels_c),
        "diff_cyc": L.anatomy_difference_loss(labels_a, labels_b, labels_c),
    }
    terms["total"] = L.total_generator_loss(terms, L.EQ11_WEIGHTS)
    terms["d"] = L.lsgan_discriminator_loss(scores, 1.0 - scores)
    return terms


def _random_inputs(batch=2):
    rng = np.random.default_rng(5)
    labels = [np.eye(3, dtype=np.float32)[rng.integers(0, 3, (batch, 8, 8, 8))] for _ in range(3)]
    return [t32(rng.random((batch, 8, 8, 8, 1))), t32(rng.random((batch, 8, 8, 8, 1))),
            t32(rng.normal(size=(batch, 8, 8, 8, 3))), t32(rng.normal(size=(batch, 8, 8, 8, 3))),
            *map(t32, labels), t32(rng.random((batch, 2, 2, 2, 1)))]


def test_losses_inside_tf_function_and_mirrored_strategy():
    inputs = _random_inputs()
    eager = _all_losses(*inputs)
    for name, value in eager.items():
        assert value.shape == (2,), name
        assert value.dtype == tf.float32, name
    graph = tf.function(_all_losses)(*inputs)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    distributed = strategy.run(tf.function(_all_losses), args=tuple(inputs))
    for name in eager:
        np.testing.assert_allclose(graph[name].numpy(), eager[name].numpy(), rtol=1e-5, err_msg=name)
        value = strategy.experimental_local_results(distributed[name])[0]
        np.testing.assert_allclose(value.numpy(), eager[name].numpy(), rtol=1e-5, err_msg=name)
