"""LT-Net losses (Wang et al., CVPR 2020, Sections 3-5, Eq. (3)-(11)) in pure TensorFlow.

Conventions
-----------
* Tensors are ``(batch, x, y, z, channels)``; every input is cast to float32.
* Displacement fields have 3 channels in voxel units and follow voxelmorph's pull convention
  ``warped(t) = moving(t + field(t))``, i.e. ``SpatialTransformer(interp_method='linear',
  indexing='ij')([moving, field])``. Positions outside the grid take the nearest border value
  (voxelmorph's default ``fill_value=None``).
* **Every loss returns a per-example tensor of shape ``(batch,)``** (each example reduced over
  all of its non-batch axes) and never averages over the batch itself. The training step reduces
  it, e.g. with ``tf.nn.compute_average_loss(per_example, global_batch_size=...)``, which is what
  makes the losses correct under ``tf.distribute.MirroredStrategy``. Only :func:`charbonnier`
  (an element-wise penalty) and :func:`compose_fields` (a field) return full-size tensors.
* Only TensorFlow ops are used (no numpy on tensors), so everything runs inside
  ``tf.function`` and in a replica context.

Term names used by :func:`total_generator_loss` (Eq. (11)): ``'gan'`` (Eq. (4), generator side),
``'sim'`` (Sec. 3, negative local CC), ``'cyc'`` (Eq. (7)), ``'smooth'`` (Eq. (6) = Eq. (3) on
the forward field plus Eq. (3) on the backward field), ``'trans'`` (Eq. (8)), ``'anatomy_cyc'``
(Eq. (9)) and ``'diff_cyc'`` (Eq. (10)).
"""
import numbers

import tensorflow as tf  # the package __init__ has already set TF_USE_LEGACY_KERAS=1

from ltnet_keras.config import EXTENSION_TERMS, LossWeights

#: Effective multiplier of each term in Eq. (11) with the paper's lambda_1 = 10, lambda_2 = 3:
#: L = GAN + sim + 10 * cyc + 3 * (anatomy_cyc + smooth + trans + diff_cyc).
EQ11_WEIGHTS = {name: weight for name, weight in LossWeights().terms().items()
                if name not in EXTENSION_TERMS}

#: The term names :func:`total_generator_loss` accepts (Eq. (11)'s and the extensions).
TERM_NAMES = tuple(LossWeights().terms())


def _f32(x):
    """``x`` as a float32 tensor."""
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def _per_example_mean(x):
    """Mean over every axis but the first (batch): shape ``(batch,)``."""
    rank = x.shape.rank
    if rank is None:
        raise ValueError("per-example reduction needs a tensor of known rank")
    if rank == 1:
        return x
    return tf.reduce_mean(x, axis=list(range(1, rank)))


def _per_example_sum(x):
    """Sum over every axis but the first (batch): shape ``(batch,)``."""
    return tf.reduce_sum(x, axis=list(range(1, x.shape.rank)))


# --------------------------------------------------------------------------------------------
# Sec. 3: image similarity (VoxelMorph's windowed local cross-correlation)
# --------------------------------------------------------------------------------------------

def _local_cc_map(target, prediction, window=9, eps=1e-5):
    """Voxel-wise squared local cross-correlation ``(batch, x, y, z, 1)`` (see :func:`local_ncc`)."""
    target = _f32(target)
    prediction = _f32(prediction)
    ndims = target.shape.rank - 2
    if ndims != 3:
        raise ValueError(f"local_ncc expects (batch, x, y, z, channels) tensors, got rank "
                         f"{target.shape.rank}")
    channels = target.shape[-1]
    if channels is None:
        raise ValueError("local_ncc needs a statically known channel count")
    n = float(window ** 3 * channels)
    # Box sums over a window^3 neighbourhood (and over the channels, as VoxelMorph does), with
    # zero padding. The box filter is separable, so three 1D passes of `window` taps replace
    # one dense window^3 convolution (27 instead of 729 multiply-adds per voxel for window 9);
    # the five quantities share the passes by riding along the batch axis.
    stacked = tf.concat([tf.reduce_sum(q, axis=-1, keepdims=True) for q in (
        target, prediction, target * target, prediction * prediction, target * prediction)],
        axis=0)
    for axis in range(3):
        kernel_shape = [1, 1, 1, 1, 1]
        kernel_shape[axis] = window
        stacked = tf.nn.conv3d(stacked, tf.ones(kernel_shape, dtype=tf.float32),
                               strides=[1, 1, 1, 1, 1], padding="SAME")
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = tf.split(stacked, 5, axis=0)
    t_mean = t_sum / n
    p_mean = p_sum / n
    # Window sums of centred products: sum (t - mean_t)(p - mean_p) etc.
    cross = tp_sum - p_mean * t_sum - t_mean * p_sum + t_mean * p_mean * n
    t_var = t2_sum - 2.0 * t_mean * t_sum + t_mean * t_mean * n
    p_var = p2_sum - 2.0 * p_mean * p_sum + p_mean * p_mean * n
    return cross * cross / (t_var * p_var + eps)


def local_ncc(target, prediction, window=9, eps=1e-5):
    """Per-example mean local (windowed) normalised cross-correlation, Sec. 3 (refs. [42, 44]).

    VoxelMorph's CC: for every voxel, box sums over the ``window^3`` neighbourhood (zero padding,
    computed as three separable 1D passes; channels are summed too) give
    ``cross = sum (t - mean_t)(p - mean_p)``, ``var_t = sum (t - mean_t)^2`` and ``var_p``, and
    ``cc = cross^2 / (var_t * var_p + eps)`` -- the squared local Pearson correlation, in [0, 1).
    Identical images give ``cc ~= 1`` wherever the local variance is non-zero; ``cc = 0`` where
    either image is locally constant.

    This is the formula of the VoxelMorph release the paper builds on. The installed
    ``voxelmorph.losses.NCC`` (0.2) additionally clamps ``cross`` and the variances at ``eps``
    before dividing; the two agree wherever the local cross-covariance is positive (in practice
    on non-negative intensity images, where zero padding alone keeps it positive), and differ
    only in anti-correlated windows, which count as correlated here (``cross^2``).

    Args:
        target, prediction: ``(batch, x, y, z, channels)`` images.
        window: side of the cubic window in voxels.
        eps: added to the variance product.

    Returns:
        ``(batch,)``: the mean of ``cc`` over voxels of each example.
    """
    return _per_example_mean(_local_cc_map(target, prediction, window=window, eps=eps))


def similarity_loss(target, prediction, window=9):
    """L_sim (Sec. 3): ``-local_ncc(target, prediction, window)``, shape ``(batch,)``.

    In LT-Net, ``target = u`` (the unlabelled image) and ``prediction = u_bar`` (the warped atlas).
    """
    return -local_ncc(target, prediction, window=window)


# --------------------------------------------------------------------------------------------
# Eq. (3)/(6): transformation smoothness
# --------------------------------------------------------------------------------------------

def smoothness_loss(field):
    """L_smooth of one displacement field, Eq. (3); Eq. (6) is its sum over dp_F and dp_B.

    Eq. (3) writes ``sum_t ||grad dp(t)||_2`` with the gradient approximated by differences of
    neighbouring voxels; as in VoxelMorph's released code (``Grad('l2')``) it is implemented as
    the *mean squared forward difference*::

        d_k = field[:, 1:, ...] - field[:, :-1, ...]   along spatial axis k in (x, y, z)
        L   = (mean(d_x^2) + mean(d_y^2) + mean(d_z^2)) / 3

    where each mean runs over that example's ``(n_k - 1)`` difference positions along ``k`` (times
    the other two extents) and over the 3 components. E.g. a field whose 3 components all equal
    ``a * x`` gives ``a^2 / 3``; only one component equal to ``a * x`` gives ``a^2 / 9``.

    Args:
        field: ``(batch, x, y, z, 3)`` displacement field.

    Returns:
        ``(batch,)``.
    """
    return _mean_squared_differences(_f32(field))


# One XLA program, and its gradient another: the differences and their gradients fuse into a
# pass or two over the field, where TensorFlow's gradient of each of the six slices writes a
# zero-padded full-size copy (fwd + bwd 0.12 s -> 0.02 s per 80x96x80 field on 2 cores).
@tf.function(jit_compile=True)
def _mean_squared_differences(field):
    differences = (field[:, 1:, :, :, :] - field[:, :-1, :, :, :],
                   field[:, :, 1:, :, :] - field[:, :, :-1, :, :],
                   field[:, :, :, 1:, :] - field[:, :, :, :-1, :])
    return tf.add_n([_per_example_mean(d * d) for d in differences]) / 3.0


# --------------------------------------------------------------------------------------------
# Eq. (4): adversarial loss (least-squares GAN)
# --------------------------------------------------------------------------------------------

def lsgan_discriminator_loss(real_scores, fake_scores, real_target=1.0):
    """Discriminator side of L_GAN, Eq. (4), as a least-squares GAN (real -> 1, fake -> 0).

    ``0.5 * (mean((D(u) - real_target)^2) + mean(D(u_bar)^2))`` per example, means over the
    (PatchGAN) score map; ``real_target < 1`` is one-sided label smoothing (not in the paper). Eq. (4) as printed puts ``||D(u)||`` on real and ``||D(u_bar) - 1||`` on fake
    images (the labels swapped) and uses norms; the text (D flags synthesised images, G tries to
    make ``u_bar`` pass as real) describes the standard LSGAN objective implemented here.

    Args:
        real_scores: ``D(u)``, ``(batch, ...)``.
        fake_scores: ``D(u_bar)``, ``(batch, ...)`` (stop gradients to G in the caller).

    Returns:
        ``(batch,)``.
    """
    real_scores = _f32(real_scores)
    fake_scores = _f32(fake_scores)
    return 0.5 * (_per_example_mean(tf.square(real_scores - real_target))
                  + _per_example_mean(tf.square(fake_scores)))


def lsgan_generator_loss(fake_scores):
    """Generator side of L_GAN, Eq. (4): ``mean((D(u_bar) - 1)^2)`` per example.

    G is rewarded when D scores the warped atlas ``u_bar`` as it scores real images (target 1).
    See :func:`lsgan_discriminator_loss` for how this reads Eq. (4).

    Returns:
        ``(batch,)``.
    """
    return _per_example_mean(tf.square(_f32(fake_scores) - 1.0))


# --------------------------------------------------------------------------------------------
# Eq. (7): image cycle consistency
# --------------------------------------------------------------------------------------------

def image_cycle_loss(atlas, reconstructed_atlas, eps=0.0, gamma=0.5):
    """L_cyc, Eq. (7): mean absolute difference ``mean |l_bar - l|`` per example (L1, averaged
    over voxels and channels rather than summed).

    ``eps > 0`` (not in the paper) replaces ``|x|`` by :func:`charbonnier` ``(x^2 + eps^2)^gamma``,
    whose gradient vanishes at ``x = 0`` instead of staying at +-1.

    Returns:
        ``(batch,)``.
    """
    difference = _f32(reconstructed_atlas) - _f32(atlas)
    if eps == 0:
        return _per_example_mean(tf.abs(difference))
    return _per_example_mean(charbonnier(difference, eps=eps, gamma=gamma))


# --------------------------------------------------------------------------------------------
# Eq. (8): transformation consistency
# --------------------------------------------------------------------------------------------

def charbonnier(x, eps=0.001, gamma=0.45):
    """Generalised Charbonnier penalty of Eq. (8): ``rho(x) = (x^2 + eps^2)^gamma``, element-wise.

    The paper's setting (from ref. [29]) is ``eps = 0.001, gamma = 0.45``; ``rho(0) =
    eps^(2 gamma)``. Returns a tensor of the shape of ``x``.
    """
    x = _f32(x)
    return tf.pow(x * x + eps * eps, gamma)


def compose_fields(inner, outer, warp=None):
    """The composed displacement ``inner(t) + outer(t + inner(t))``, shape of ``inner``.

    ``outer`` is resampled at the positions displaced by ``inner`` with voxelmorph's
    ``SpatialTransformer`` (linear, 'ij') applied to the field itself, or with ``warp(outer,
    inner)`` if given (any function computing the same, e.g. ``models.trilinear.warp``). Under the pull convention
    ``warp(m, f)(t) = m(t + f(t))``, ``warp(warp(m, outer), inner) = warp(m, compose_fields(inner,
    outer))``: warping by ``outer`` first and then by ``inner`` is one warp by the composition.
    """
    # Imported here so that importing this module stays light (voxelmorph pulls in neurite).
    import voxelmorph as vxm

    inner = _f32(inner)
    outer = _f32(outer)
    if warp is not None:
        return inner + warp(outer, inner)
    transformer = vxm.layers.SpatialTransformer(interp_method="linear", indexing="ij")
    return inner + transformer([outer, inner])


def transformation_consistency_loss(forward_field, backward_field, eps=0.001, gamma=0.45,
                                    warp=None):
    """L_trans, Eq. (8): ``mean_t rho(dp_F(t) + dp_B(t + dp_F(t)))`` per example.

    The mean runs over voxels and the 3 components (the printed sum over ``t``, divided by the
    number of terms so that its magnitude is comparable with the other terms, Sec. 5).

    Why this order of composition: with the pull convention, ``dp_F`` maps coordinates of ``u`` to
    those of ``l`` (``u_bar(t) = l(t + dp_F(t))``, Eq. (1)) and ``dp_B`` maps coordinates of
    ``l``'s grid to those of ``u_bar`` (i.e. of ``u``): ``l_bar(s) = u_bar(s + dp_B(s))``, Eq. (5).
    A point ``t`` of ``u`` goes to ``t + dp_F(t)`` in ``l`` and back to
    ``t + dp_F(t) + dp_B(t + dp_F(t))`` in ``u``; the round trip is the identity iff
    ``compose_fields(dp_F, dp_B)`` vanishes, so that is what is penalised. (``l_bar`` itself is
    ``l`` pulled through the other order, ``dp_B(s) + dp_F(s + dp_B(s)) = compose_fields(dp_B,
    dp_F)``; both compositions vanish when the two fields are exact inverses.)

    Args:
        forward_field: ``dp_F``, ``(batch, x, y, z, 3)``.
        backward_field: ``dp_B``, ``(batch, x, y, z, 3)``.
        warp: how to resample ``dp_B`` (see :func:`compose_fields`).

    Returns:
        ``(batch,)``; its minimum, for exactly inverse fields, is ``rho(0) = eps^(2 gamma)``.
    """
    residual = compose_fields(forward_field, backward_field, warp)
    return _per_example_mean(charbonnier(residual, eps=eps, gamma=gamma))


# --------------------------------------------------------------------------------------------
# Eq. (9), (10): label-space consistency
# --------------------------------------------------------------------------------------------

def anatomy_cycle_loss(atlas_labels, reconstructed_atlas_labels, exclude_background=True):
    """L_anatomy_cyc, Eq. (9): soft Dice loss between ``l_s`` and ``l_bar_s``, per example.

    ``1 - 2 sum l_s * l_bar_s / (sum l_s^2 + sum l_bar_s^2)`` with every sum over all voxels *and*
    all structure channels together (one Dice per example, not a mean of per-label Dices). Inputs
    are one-hot / soft maps ``(batch, x, y, z, channels)``; channel 0 is background and is left
    out by default (``exclude_background=True``) since, covering most of the volume, it would
    dominate the sums. An example where both maps are empty scores 0 (identical).

    Returns:
        ``(batch,)``.
    """
    truth = _f32(atlas_labels)
    pred = _f32(reconstructed_atlas_labels)
    if exclude_background:
        truth = truth[..., 1:]
        pred = pred[..., 1:]
    overlap = _per_example_sum(truth * pred)
    denominator = _per_example_sum(truth * truth) + _per_example_sum(pred * pred)
    dice = tf.where(denominator > 0.0,
                    2.0 * overlap / tf.maximum(denominator, 1e-12),
                    tf.ones_like(denominator))
    return 1.0 - dice


def anatomy_difference_loss(atlas_labels, warped_atlas_labels, reconstructed_atlas_labels,
                            eps=0.001, gamma=0.45):
    """L_diff_cyc, Eq. (10): ``mean rho(|l_s - u_bar_s| - |u_bar_s - l_bar_s|)`` per example.

    ``rho`` is :func:`charbonnier`; the mean runs over voxels and all label channels (background
    included). The printed sum over ``t`` is replaced by the mean so that the magnitude is
    comparable with the other weighted terms, as Sec. 5 says the four lambda_2 terms are.

    Args:
        atlas_labels: ``l_s``; warped_atlas_labels: ``u_bar_s`` (Eq. (2));
        reconstructed_atlas_labels: ``l_bar_s`` -- all ``(batch, x, y, z, channels)``.

    Returns:
        ``(batch,)``.
    """
    l_s = _f32(atlas_labels)
    u_bar_s = _f32(warped_atlas_labels)
    l_bar_s = _f32(reconstructed_atlas_labels)
    difference = tf.abs(l_s - u_bar_s) - tf.abs(u_bar_s - l_bar_s)
    return _per_example_mean(charbonnier(difference, eps=eps, gamma=gamma))


# --------------------------------------------------------------------------------------------
# Eq. (11): total generator objective
# --------------------------------------------------------------------------------------------

def total_generator_loss(terms, weights):
    """The generator objective of Eq. (11), a weighted sum of per-example terms.

    ``L = GAN + sim + lambda_1 * cyc + lambda_2 * (anatomy_cyc + smooth + trans + diff_cyc)``
    computed as ``sum_name weights[name] * terms[name]``, where ``weights`` holds each term's
    *effective* multiplier (``EQ11_WEIGHTS`` is the paper's setting: lambda_1 = 10,
    lambda_2 = 3). A term whose weight is absent from ``weights`` or is (Python) zero is
    skipped, and need not be in ``terms``.

    Args:
        terms: ``{name: (batch,) tensor}`` with names from :data:`TERM_NAMES`.
        weights: ``{name: float}`` (a tensor weight is always applied).

    Returns:
        ``(batch,)`` float32.

    Raises:
        ValueError: an unknown name in ``terms`` or ``weights`` (the message lists the valid
            ones), a weighted term missing from ``terms``, or nothing left to sum.
    """
    unknown = sorted((set(terms) | set(weights)) - set(TERM_NAMES))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; valid names are {list(TERM_NAMES)}")
    total = None
    for name in TERM_NAMES:
        if name not in weights:
            continue
        weight = weights[name]
        if isinstance(weight, numbers.Real) and weight == 0:
            continue
        if name not in terms:
            raise ValueError(f"loss term {name!r} has weight {weight} but was not computed; "
                             f"given terms: {sorted(terms)}")
        contribution = _f32(weight) * _f32(terms[name])
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError(f"no loss term with a non-zero weight; weights: {dict(weights)}")
    return total
