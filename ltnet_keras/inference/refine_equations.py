"""The equations of test-time refinement (:mod:`ltnet_keras.inference.refine`), each with its
gradient written out: separable box sums, the smoothing of the update, local NCC, the
diffusion regulariser, the trilinear warp and its derivative, scaling and squaring, and the
folding fraction of a field.
"""
import numpy as np
import tensorflow as tf

from ltnet_keras.models import trilinear

NCC_EPSILON = 1e-5
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-12    # the per-voxel gradients of a voxel mean are ~1e-7: keep eps below


# -------------------------------------------------------------------------- the equations
# Volumes are channels-first, ``(C, x, y, z)``: box sums then slide along contiguous rows.
# Gradients are written out (no autodiff) and each piece is its own XLA program: compiled
# together, XLA fuses the shifted slices of the box sums into their consumers and recomputes
# whole chains (warp, previous passes) per read, 2-20x slower than the pieces apart.
def box_sum_axis(volume, window: int, axis: int):
    """Sum of ``(C, x, y, z)`` over ``window`` neighbours along ``axis`` (1, 2 or 3), zero
    padding: ``window`` shifted slices added (XLA fuses them into one pass)."""
    radius = window // 2
    padding = [[0, 0]] * 4
    padding[axis] = [radius, radius]
    padded = tf.pad(volume, padding)
    total = None
    for shift in range(window):
        begin, size = [0] * 4, [-1] * 4
        begin[axis], size[axis] = shift, volume.shape[axis]
        part = tf.slice(padded, begin, size)
        total = part if total is None else total + part
    return total


def box_sum(volume, window: int):
    """Sum of ``(C, x, y, z)`` over the ``window^3`` box around each voxel (zero padding), as
    three separable 1D passes: ``3 window`` additions per voxel, not ``window^3``."""
    for axis in (1, 2, 3):
        volume = box_sum_axis(volume, window, axis)
    return volume


def _inverse_counts(shape, axis: int) -> np.ndarray:
    """``1 / (voxels inside the 3-neighbourhood)`` along ``axis``: 1/3, 1/2 at the ends."""
    n = shape[axis]
    count = np.minimum(np.arange(n) + 1, 2) + np.minimum(n - 1 - np.arange(n), 1)
    view = [1, 1, 1, 1]
    view[axis] = n
    return (1.0 / count).astype(np.float32).reshape(view)


def smooth(field, passes: int):
    """``passes`` 3^3 moving averages of ``(C, x, y, z)`` (at the borders the mean of the
    voxels inside): a cheap B-spline-like smoothing of the update (ConvexAdam)."""
    for _ in range(passes):
        for axis in (1, 2, 3):
            field = box_sum_axis(field, 3, axis) * _inverse_counts(field.shape, axis)
    return field


def smooth_transpose(gradient, passes: int):
    """The transpose of :func:`smooth`: ``dL/d(input)`` from ``dL/d(output)``."""
    for _ in range(passes):
        for axis in (3, 2, 1):
            gradient = box_sum_axis(gradient * _inverse_counts(gradient.shape, axis), 3, axis)
    return gradient


def target_sums(target, window: int):
    """Box sums ``(T, TT)`` of the target ``(x, y, z)`` and its square: fixed per level."""
    return box_sum(tf.stack([target, target * target]), window)


def ncc_and_gradient(target, warped, window: int, sums=None):
    """Mean over the ``M`` voxels of the squared local correlation of ``(x, y, z)`` images in
    ``window^3`` boxes, voxelmorph's NCC (``ltnet_keras.losses.local_ncc``), and its gradient
    with respect to ``warped``. From box sums ``T = box(t)``, ``W``, ``TT``, ``WW``, ``TW``::

        cross = TW - T W / n,  var_t = TT - T^2 / n,  var_w = WW - W^2 / n   (n = window^3)
        cc = cross^2 / D,  D = var_t var_w + eps
        dL/dw = t box(a) - box(a T / n) + 2 w box(b) - 2 box(b W / n),
        a = 2 cross / (D M),  b = -cross^2 var_t / (D^2 M)

    ``sums``: :func:`target_sums`, if made already."""
    sums = target_sums(target, window) if sums is None else sums
    t_sum, tt_sum = sums[0], sums[1]
    n = float(window ** 3)
    voxels = float(np.prod(target.shape))
    w_sum, ww_sum, tw_sum = tf.unstack(box_sum(
        tf.stack([warped, warped * warped, target * warped]), window))
    cross = tw_sum - t_sum * w_sum / n
    t_var = tt_sum - t_sum * t_sum / n
    w_var = ww_sum - w_sum * w_sum / n
    denominator = t_var * w_var + NCC_EPSILON
    a = 2.0 * cross / (denominator * voxels)
    b = -cross * cross * t_var / (denominator * denominator * voxels)
    boxes = box_sum(tf.stack([a, a * t_sum / n, b, b * w_sum / n]), window)
    gradient = target * boxes[0] - boxes[1] + 2.0 * warped * boxes[2] - 2.0 * boxes[3]
    return tf.reduce_mean(cross * cross / denominator), gradient


def diffusion_and_gradient(field):
    """Diffusion regulariser of ``(3, x, y, z)`` in level voxels and its gradient: the mean
    squared forward difference averaged over the 3 axes (voxelmorph's ``Grad('l2')``, the
    project's ``ltnet_keras.losses.smoothness_loss``); a smooth physical field scores the
    same at every level. ``dL/du = sum_axes 2 / (3 |d|) (d[i - 1] - d[i])``."""
    value, gradient = 0.0, 0.0
    for axis in (1, 2, 3):
        size = [-1] * 4
        size[axis] = field.shape[axis] - 1
        begin = [0] * 4
        begin[axis] = 1
        difference = tf.slice(field, begin, size) - tf.slice(field, [0] * 4, size)
        count = float(np.prod(difference.shape))
        value += tf.reduce_sum(difference * difference) / (3.0 * count)
        before, after = [[0, 0]] * 4, [[0, 0]] * 4
        before[axis], after[axis] = [1, 0], [0, 1]
        gradient += (tf.pad(difference, before) - tf.pad(difference, after)) * (2.0 / (3.0 * count))
    return value, gradient


def corner_table(volume):
    """``(x y z, 8)``: the 8 corners of every voxel's cell in the trilinear warp's order
    (:data:`ltnet_keras.models.trilinear.CORNERS`), the far ones repeated at the upper borders
    (where the warp clamps the upper corner to the volume). Made once per level, it turns
    the warp's 8 gathers into one gather of 8 contiguous values."""
    padded = tf.pad(volume, [[0, 1], [0, 1], [0, 1]], mode="SYMMETRIC")
    x, y, z = volume.shape
    return tf.reshape(tf.stack([padded[i:i + x, j:j + y, k:k + z]
                                for i, j, k in trilinear.CORNERS], -1), [-1, 8])


def cells(field):
    """The trilinear cells the warp by ``field`` ``(3, x, y, z)`` reads (positions clamped to
    the volume, upper corner ``lower + 1`` clamped): the flat index of each voxel's lower
    corner ``(x, y, z)``, the weight of the lower corner along each axis and its slope, the
    derivative's factor (0 where clamped), both ``(3, x, y, z)``."""
    shape = field.shape[1:]
    index, weight_lower, slope = 0, [], []
    for axis in range(3):
        view = [1, 1, 1]
        view[axis] = shape[axis]
        top = float(shape[axis] - 1)
        position = field[axis] + tf.reshape(tf.range(shape[axis], dtype=tf.float32), view)
        clamped = tf.clip_by_value(position, 0.0, top)
        low = tf.clip_by_value(tf.floor(position), 0.0, top)
        index = index + tf.cast(low, tf.int32) * int(np.prod(shape[axis + 1:]))
        weight_lower.append(tf.minimum(low + 1.0, top) - clamped)
        slope.append(tf.cast(tf.equal(position, clamped), tf.float32))
    return index, weight_lower, slope


def warp_and_derivative(table, field):
    """``volume(grid + field)`` and its derivative ``(3, x, y, z)`` with respect to
    ``field``, from ``table = corner_table(volume)``: the trilinear warp of
    :mod:`ltnet_keras.models.trilinear` (neurite's ``interpn``: positions clamped to the
    volume, upper corner ``lower + 1`` clamped, zero derivative where clamped) of ``(x, y, z)``
    by ``(3, x, y, z)`` voxels. The 8 corners are interpolated along z, then y, then x,
    carrying the 3 partial derivatives along."""
    index, weight_lower, slope = cells(field)
    corners = tf.gather(table, index)               # (x, y, z, 8), z fastest in the 8

    def along(low, high, axis):   # value and derivative of a 1D linear interpolation
        return (low * weight_lower[axis] + high * (1.0 - weight_lower[axis]),
                (high - low) * slope[axis])

    e = {(i, j): along(corners[..., 4 * i + 2 * j], corners[..., 4 * i + 2 * j + 1], 2)
         for i in (0, 1) for j in (0, 1)}
    f = {}
    for i in (0, 1):
        value, d_y = along(e[i, 0][0], e[i, 1][0], 1)
        d_z, _ = along(e[i, 0][1], e[i, 1][1], 1)
        f[i] = (value, d_y, d_z)
    value, d_x = along(f[0][0], f[1][0], 0)
    d_y, _ = along(f[0][1], f[1][1], 0)
    d_z, _ = along(f[0][2], f[1][2], 0)
    return value, tf.stack([d_x, d_y, d_z])


def integrate_velocity(velocity, steps: int):
    """Scaling and squaring of ``(3, x, y, z)``: ``exp(v)`` as a displacement, ``u = v /
    2^steps`` composed with itself ``steps`` times, ``u <- u + u(grid + u)``
    (:func:`ltnet_keras.models.trilinear.warp`, differentiable in both)."""
    field = tf.transpose(velocity, [1, 2, 3, 0])[None] / float(2 ** steps)
    for _ in range(steps):
        field = field + trilinear.warp(field, field)
    return tf.transpose(field[0], [3, 0, 1, 2])


def objective(atlas, target, field, window: int, weight):
    """The refinement loss ``-local_ncc(target, atlas o field) + weight * diffusion(field)``
    (images ``(x, y, z)``, field ``(3, x, y, z)``) and its gradient with respect to the field."""
    warped, derivative = warp_and_derivative(corner_table(atlas), field)
    similarity, d_warped = ncc_and_gradient(target, warped, window)
    regulariser, d_field = diffusion_and_gradient(field)
    return (-similarity + weight * regulariser,
            -d_warped[None] * derivative + weight * d_field)


def adam_update(delta, m, v, gradient, step, learning_rate):
    """One Adam step (Kingma & Ba) on ``delta``: returns the new ``delta``, ``m``, ``v``."""
    beta1, beta2 = ADAM_BETAS
    m = beta1 * m + (1.0 - beta1) * gradient
    v = beta2 * v + (1.0 - beta2) * gradient * gradient
    update = (m / (1.0 - beta1 ** step)) / (tf.sqrt(v / (1.0 - beta2 ** step)) + ADAM_EPSILON)
    return delta - learning_rate * update, m, v


def folding_fraction(field: np.ndarray) -> float:
    """Fraction of voxels of ``(x, y, z, 3)`` (voxels) where ``det(I + grad u) <= 0``, the
    map folds; derivatives by central differences (one-sided at the borders)."""
    field = np.asarray(field, np.float64)
    # Row i of the Jacobian: the gradient of component i, plus the identity's row; the 3x3
    # determinant by cofactors, without stacking 9 volumes into matrices (3x quicker).
    d = [[g + (i == j) for j, g in enumerate(np.gradient(field[..., i], axis=(0, 1, 2)))]
         for i in range(3)]
    determinant = (d[0][0] * (d[1][1] * d[2][2] - d[1][2] * d[2][1])
                   - d[0][1] * (d[1][0] * d[2][2] - d[1][2] * d[2][0])
                   + d[0][2] * (d[1][0] * d[2][1] - d[1][1] * d[2][0]))
    return float(np.mean(determinant <= 0.0))
