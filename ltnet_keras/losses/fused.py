"""Eq. (9) and (10) in one pass over the label maps: the fast path of the label-space terms.

:func:`label_cycle_terms` returns what :func:`losses.anatomy_cycle_loss` and
:func:`losses.anatomy_difference_loss` return for a one-hot atlas, with the gradients
autodiff would give (``|x|`` has slope ``sign(x)``, 0 at 0), and differs only in float
rounding. The maps have one channel per label (57 for LPBA40), so written term by term these
two losses cost about as much as a U-Net: every ``abs``, ``pow``, slice and product is a
pass over ``voxels x channels`` and its gradient another. Here the forward is one XLA loop
that reads the two warped maps once (the one-hot atlas is rebuilt from its label index on
the fly), and the backward one more loop that also writes the two gradients. The
Charbonnier penalty is evaluated as ``exp(gamma * log(x^2 + eps^2))``, the same function as
``pow``, because XLA vectorises ``exp`` and ``log`` but calls ``powf`` element by element.
"""
from typing import Dict

import tensorflow as tf


def _compiled(fn):
    return tf.function(fn, jit_compile=True)


def one_hot_index(one_hot):
    """``(batch, x, y, z)`` int32 label channel of a one-hot map ``(..., C)``, and whether
    the map is one-hot (each voxel's channels are 0 but one 1) everywhere (a bool scalar)."""
    return _one_hot_index(tf.convert_to_tensor(one_hot, tf.float32))


@_compiled
def _one_hot_index(one_hot):
    index = tf.argmax(one_hot, axis=-1, output_type=tf.int32)
    is_one_hot = tf.reduce_all(tf.logical_and(
        tf.reduce_max(one_hot, -1) == 1.0, tf.reduce_sum(tf.abs(one_hot), -1) == 1.0))
    return index, is_one_hot


def _flat(x):
    """``(batch, ...)`` -> ``(batch, everything else)``, so that reductions are one loop."""
    return tf.reshape(x, [tf.shape(x)[0], -1])


def _atlas_one_hot(label_index, n_channels):
    return tf.one_hot(label_index, n_channels, dtype=tf.float32)


def _charbonnier(x, eps, gamma):
    """``(x^2 + eps^2)^gamma`` and ``x^2 + eps^2``."""
    base = x * x + eps * eps
    return tf.exp(gamma * tf.math.log(base)), base


def _foreground(n_channels):
    """``(C,)`` 0. for channel 0 (background), 1. for the others."""
    return tf.concat([[0.0], tf.ones([n_channels - 1])], 0)


@_compiled
def _voxel_sums(label_index, warped, reconstructed, eps, gamma):
    """Per voxel ``(batch, x, y, z)``: the Charbonnier terms of Eq. (10) summed over channels,
    ``sum_{k >= 1} l_bar_k^2`` and the atlas' own channel of ``l_bar`` (0 on background).

    Sums over channels only: XLA's CPU reductions over whole volumes are several times slower
    than TensorFlow's, so those are left to the caller."""
    n_channels = warped.shape[-1]
    atlas = _atlas_one_hot(label_index, n_channels)
    difference = tf.abs(atlas - warped) - tf.abs(warped - reconstructed)
    penalty, _ = _charbonnier(difference, eps, gamma)
    squares = tf.reduce_sum(tf.square(reconstructed) * _foreground(n_channels), -1)
    own = tf.gather(reconstructed, label_index[..., None], batch_dims=4)[..., 0]
    return (tf.reduce_sum(penalty, -1), squares,
            tf.where(label_index > 0, own, tf.zeros_like(own)))


def _forward(label_index, warped, reconstructed, eps, gamma):
    penalty, squares, own = _voxel_sums(label_index, warped, reconstructed, eps, gamma)
    volume = [1, 2, 3]
    overlap = tf.reduce_sum(own, volume)
    truth = tf.reduce_sum(tf.cast(label_index > 0, tf.float32), volume)
    denominator = truth + tf.reduce_sum(squares, volume)
    dice = tf.where(denominator > 0.0, 2.0 * overlap / tf.maximum(denominator, 1e-12),
                    tf.ones_like(denominator))
    count = tf.cast(tf.reduce_prod(tf.shape(warped)[1:]), tf.float32)
    return 1.0 - dice, tf.reduce_sum(penalty, volume) / count, overlap, denominator


@_compiled
def _backward(label_index, warped, reconstructed, eps, gamma, overlap, denominator,
              dice_upstream, difference_upstream):
    n_channels = warped.shape[-1]
    per_example = [-1] + [1] * (warped.shape.rank - 1)
    atlas = _atlas_one_hot(label_index, n_channels)
    to_atlas, to_reconstructed = atlas - warped, warped - reconstructed
    difference = tf.abs(to_atlas) - tf.abs(to_reconstructed)
    penalty, base = _charbonnier(difference, eps, gamma)
    count = tf.cast(tf.reduce_prod(tf.shape(warped)[1:]), tf.float32)
    # d rho / d x = 2 gamma x rho / (x^2 + eps^2), scaled by the mean's 1 / count
    slope = (tf.reshape(difference_upstream / count, per_example)
             * 2.0 * gamma * difference * penalty / base)
    warped_gradient = slope * (-tf.sign(to_atlas) - tf.sign(to_reconstructed))
    reconstructed_gradient = slope * tf.sign(to_reconstructed)
    # d(1 - 2 o / d) / d l_bar = -2 (atlas d - o 2 l_bar) / d^2 on the foreground channels
    safe = tf.maximum(denominator, 1e-12)
    dice_scale = tf.where(denominator > 0.0, dice_upstream, tf.zeros_like(dice_upstream))
    dice_gradient = (-2.0 * tf.reshape(dice_scale / safe, per_example)
                     * (atlas - tf.reshape(2.0 * overlap / safe, per_example) * reconstructed)
                     * _foreground(n_channels))
    return warped_gradient, reconstructed_gradient + dice_gradient


def label_cycle_terms(label_index, warped, reconstructed, eps=0.001,
                      gamma=0.45) -> Dict[str, tf.Tensor]:
    """Eq. (9) and (10) per example, for the atlas with label channel ``label_index``.

    ``{"anatomy_cyc": anatomy_cycle_loss(one_hot, reconstructed), "diff_cyc":
    anatomy_difference_loss(one_hot, warped, reconstructed, eps, gamma)}`` where ``one_hot``
    is the one-hot map of ``label_index`` (background channel 0 left out of the Dice, as
    there). ``warped`` (``u_bar_s``) and ``reconstructed`` (``l_bar_s``) get gradients.

    Args:
        label_index: ``(batch, x, y, z)`` int32 (see :func:`one_hot_index`).
        warped, reconstructed: ``(batch, x, y, z, C)``.

    Returns:
        Both terms, each ``(batch,)``.
    """
    label_index = tf.cast(label_index, tf.int32)
    warped = tf.convert_to_tensor(warped, tf.float32)
    reconstructed = tf.convert_to_tensor(reconstructed, tf.float32)
    eps, gamma = float(eps), float(gamma)

    @tf.custom_gradient
    def terms(warped, reconstructed):
        dice, difference, overlap, denominator = _forward(label_index, warped, reconstructed,
                                                          eps, gamma)

        def gradient(dice_upstream, difference_upstream):
            return _backward(label_index, warped, reconstructed, eps, gamma, overlap,
                             denominator, dice_upstream, difference_upstream)

        return (dice, difference), gradient

    dice, difference = terms(warped, reconstructed)
    return {"anatomy_cyc": dice, "diff_cyc": difference}
