"""Trilinear warps with hand-written gradients: the fast path of LT-Net's warps.

Every function here computes what voxelmorph 0.2's ``SpatialTransformer(interp_method=
'linear', indexing='ij', fill_value=None)`` computes (pull convention ``warped(t) =
moving(t + field(t))`` in voxels, positions clamped to the volume), with the same corner
weights, and differs from it only in float rounding. What changes is the cost:

* The 8 corners (row index and weight) of every voxel are worked out once per field
  (:func:`corner_table`) and shared by every warp by that field.
* Gradients are written out instead of left to autodiff, so the backward pass keeps no
  gathered ``(voxels, channels)`` copy per corner alive.
* A one-hot label map (the atlas labels, Eq. 2) is warped from its label *index* map: the 8
  corners of a voxel carry 8 labels, so each channel of the warped one-hot map is the sum of
  the weights of the corners carrying its label, and its gradient is 8 look-ups per voxel
  instead of 8 dot products over all channels. The gradient of warping that map once more
  (``l_bar_s``, Fig. 2) is likewise read at 64 (weight, label) pairs per voxel, never
  scattered as ``(voxels, channels)`` rows.
* Each piece runs as one XLA program. TensorFlow's CPU scatter (UnsortedSegmentSum) is
  5-15x slower than XLA's, and XLA fuses the corner arithmetic into the gathers.

The batch is flattened into the voxel axis (``N = batch * x * y * z`` rows); a voxel only
samples its own example. Labels are trilinearly interpolated exactly as their one-hot map
would be: nothing here is an approximation.
"""
import itertools
from typing import NamedTuple, Optional

import tensorflow as tf

#: The 8 corners of a voxel's cell in voxelmorph's order (``itertools.product``, z fastest).
CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _compiled(fn):
    return tf.function(fn, jit_compile=True, autograph=False)


class CornerTable(NamedTuple):
    """The 8 corners each voxel of a field samples."""
    #: ``(N, 8)`` int32: row of each corner in the batch-flattened ``(N, channels)`` volume.
    index: tf.Tensor
    #: ``(N, 8)`` float32: trilinear weight of each corner (they sum to 1 per voxel).
    weight: tf.Tensor


def _axis_terms(field):
    """Per voxel and axis: clamped lower/upper corner, lower weight and in-volume mask.

    Arithmetic as in neurite's ``interpn``: the position is clamped to ``[0, size - 1]``, the
    lower corner is the clamped floor, the upper one the lower plus one (clamped), and the
    lower corner's weight is ``upper - clamped position``. ``inside`` is where autodiff of
    the clamp lets the gradient through.
    """
    shape = [int(s) for s in field.shape[1:4]]
    axes = [tf.range(n, dtype=tf.float32) for n in shape]
    grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)
    position = tf.reshape(grid[None] + field, [-1, 3])
    top = tf.constant([s - 1 for s in shape], tf.float32)
    clamped = tf.clip_by_value(position, 0.0, top)
    lower = tf.clip_by_value(tf.floor(position), 0.0, top)
    upper = tf.clip_by_value(lower + 1.0, 0.0, top)
    inside = tf.logical_and(position >= 0.0, position <= top)
    return lower, upper, upper - clamped, inside


@_compiled
def _corner_table(field):
    shape = [int(s) for s in field.shape[1:4]]
    lower, upper, weight_lower, _ = _axis_terms(field)
    ends = (tf.cast(lower, tf.int32), tf.cast(upper, tf.int32))
    axis_weights = (weight_lower, 1.0 - weight_lower)
    voxels = shape[0] * shape[1] * shape[2]
    n_rows = tf.shape(lower)[0]
    first_row = tf.range(n_rows, dtype=tf.int32) // voxels * voxels
    strides = (shape[1] * shape[2], shape[2], 1)
    index, weight = [], []
    for corner in CORNERS:
        index.append(first_row + ends[corner[0]][:, 0] * strides[0]
                     + ends[corner[1]][:, 1] * strides[1] + ends[corner[2]][:, 2])
        w = [axis_weights[c][:, d] for d, c in enumerate(corner)]
        weight.append(w[0] * w[1] * w[2])
    return tf.stack(index, 1), tf.stack(weight, 1)


def corner_table(field) -> CornerTable:
    """The :class:`CornerTable` of ``field`` ``(batch, x, y, z, 3)`` (no gradient)."""
    index, weight = _corner_table(tf.stop_gradient(tf.convert_to_tensor(field, tf.float32)))
    return CornerTable(index, weight)


def _field_gradient(corner_gradient, field):
    """Chain ``dL/dweight`` ``(N, 8)`` to ``dL/dfield`` (the shape of ``field``).

    Corner weight ``w_c = a_x a_y a_z``; ``d a / d position`` is -1 for the lower and +1 for
    the upper corner along that axis, 0 where the position was clamped.
    """
    _, _, weight_lower, inside = _axis_terms(field)
    inside = tf.cast(inside, tf.float32)
    axis_weights = (weight_lower, 1.0 - weight_lower)
    axis_slopes = (-inside, inside)
    gradient = [0.0, 0.0, 0.0]
    for c, corner in enumerate(CORNERS):
        w = [axis_weights[e][:, d] for d, e in enumerate(corner)]
        s = [axis_slopes[e][:, d] for d, e in enumerate(corner)]
        g = corner_gradient[:, c]
        gradient[0] += g * (s[0] * w[1] * w[2])
        gradient[1] += g * (w[0] * s[1] * w[2])
        gradient[2] += g * (w[0] * w[1] * s[2])
    return tf.reshape(tf.stack(gradient, -1), tf.shape(field))


def _rows(volume):
    """``(batch, x, y, z, C)`` -> ``(N, C)``."""
    return tf.reshape(volume, [-1, volume.shape[-1]])


def _interpolate(rows, index, weight):
    """``sum_c weight_c * rows[index_c]``: ``(N, C)``, corners added in voxelmorph's order."""
    out = None
    for c in range(len(CORNERS)):
        term = weight[:, c:c + 1] * tf.gather(rows, index[:, c])
        out = term if out is None else out + term
    return out


def _table(field, table: Optional[CornerTable]) -> CornerTable:
    return corner_table(field) if table is None else table


# -- dense volumes --------------------------------------------------------------------------
@_compiled
def _warp_forward(volume, index, weight):
    return tf.reshape(_interpolate(_rows(volume), index, weight), tf.shape(volume))


@_compiled
def _warp_backward(volume, field, index, weight, upstream):
    rows, upstream_rows = _rows(volume), _rows(upstream)
    corner_gradient = tf.reduce_sum(tf.gather(rows, index) * upstream_rows[:, None, :], -1)
    spread = weight[..., None] * upstream_rows[:, None, :]                     # (N, 8, C)
    volume_gradient = tf.math.unsorted_segment_sum(
        tf.reshape(spread, [-1, volume.shape[-1]]), tf.reshape(index, [-1]), tf.shape(rows)[0])
    return (tf.reshape(volume_gradient, tf.shape(volume)),
            _field_gradient(corner_gradient, field))


def warp(volume, field, table: Optional[CornerTable] = None):
    """``volume(grid + field)``: voxelmorph's linear SpatialTransformer, ``warp([volume,
    field])``. Both inputs get gradients.

    Args:
        volume: ``(batch, x, y, z, C)``; meant for few channels (images, fields): the
            backward pass spreads ``(N, 8, C)`` values at once.
        field: ``(batch, x, y, z, 3)``.
        table: ``corner_table(field)``, if already made.
    """
    volume = tf.convert_to_tensor(volume, tf.float32)
    field = tf.convert_to_tensor(field, tf.float32)
    table = _table(field, table)

    @tf.custom_gradient
    def _warp(volume, field):
        def gradient(upstream):
            return _warp_backward(volume, field, table.index, table.weight, upstream)
        return _warp_forward(volume, table.index, table.weight), gradient

    return _warp(volume, field)


# -- one-hot label maps ---------------------------------------------------------------------
def _corner_labels(label_index, index):
    """Label of each corner, the shape of ``index``."""
    return tf.gather(tf.reshape(label_index, [-1]), index)


def _pick(rows, labels):
    """``rows[n, labels[n, ...]]``: values of ``rows`` ``(N, C)`` at ``(N, ...)`` channels."""
    flat = tf.reshape(labels, [tf.shape(labels)[0], -1])
    return tf.reshape(tf.gather(rows, flat, batch_dims=1), tf.shape(labels))


@_compiled
def _one_hot_forward(label_index, index, weight, n_channels):
    # Each channel of a row compares itself with the 8 corner labels: one dense pass that XLA
    # spreads over the cores (twice as fast here as scattering the 8 weights into zeros).
    labels = _corner_labels(label_index, index)
    channels = tf.range(n_channels, dtype=tf.int32)
    rows = None
    for c in range(len(CORNERS)):
        term = tf.where(labels[:, c:c + 1] == channels, weight[:, c:c + 1], 0.0)
        rows = term if rows is None else rows + term
    return tf.reshape(rows, tf.concat([tf.shape(label_index), [n_channels]], 0))


@_compiled
def _one_hot_backward(label_index, field, index, upstream):
    picked = _pick(_rows(upstream), _corner_labels(label_index, index))
    return _field_gradient(picked, field)


def warp_one_hot(label_index, field, n_channels: int, table: Optional[CornerTable] = None):
    """The one-hot map of ``label_index`` warped by ``field``: Eq. (2), ``u_bar_s``.

    Equals ``warp(one_hot(label_index, n_channels), field)``; only ``field`` gets a gradient.

    Args:
        label_index: ``(batch, x, y, z)`` int32 label channel of every voxel.
        field: ``(batch, x, y, z, 3)``.
        n_channels: C, the number of one-hot channels (``< 2**31 / N``).
        table: ``corner_table(field)``, if already made.

    Returns:
        ``(batch, x, y, z, C)`` float32.
    """
    label_index = tf.cast(label_index, tf.int32)
    field = tf.convert_to_tensor(field, tf.float32)
    table = _table(field, table)

    @tf.custom_gradient
    def _warp(field):
        def gradient(upstream):
            return _one_hot_backward(label_index, field, table.index, upstream)
        return _one_hot_forward(label_index, table.index, table.weight, n_channels), gradient

    return _warp(field)


@_compiled
def _rewarp_backward(label_index, forward_field, backward_field, inner_index, inner_weight,
                     outer_index, outer_weight, upstream):
    upstream_rows = _rows(upstream)
    n_rows = tf.shape(upstream_rows)[0]
    # Voxel t samples the warped map at the 8 backward corners s_b(t); warped(s_b) is the 8
    # forward corners f of s_b with weight w_f(s_b) on label_f(s_b): 64 pairs (t, b, f).
    pair_labels = tf.gather(_corner_labels(label_index, inner_index), outer_index)  # (N, 8, 8)
    pair_upstream = _pick(upstream_rows, pair_labels)         # upstream(t)[label_f(s_b)]
    # dL/d(weight of backward corner b) = <upstream(t), warped(s_b)>
    #                                   = sum_f w_f(s_b) upstream(t)[label_f(s_b)].
    outer_gradient = tf.reduce_sum(tf.gather(inner_weight, outer_index) * pair_upstream, -1)
    # dL/d(weight of forward corner f at voxel s) = sum over the (t, b) with s_b(t) = s of
    # w_b(t) upstream(t)[label_f(s)]: the transpose of the backward warp, read only at the
    # 8 labels each voxel's forward corners carry.
    # Scattered as (t, b) -> 8-vectors of row s_b(t), not as 64 scalars per voxel: XLA's
    # scatter is one serial loop, and an index per 8 values makes it 20 % cheaper.
    inner_gradient = tf.math.unsorted_segment_sum(
        tf.reshape(outer_weight[..., None] * pair_upstream, [-1, 8]),
        tf.reshape(outer_index, [-1]), n_rows)
    return (_field_gradient(inner_gradient, forward_field),
            _field_gradient(outer_gradient, backward_field))


def rewarp_one_hot(label_index, warped, forward_field, backward_field,
                   forward_table: Optional[CornerTable] = None,
                   backward_table: Optional[CornerTable] = None):
    """``warped`` (= ``warp_one_hot(label_index, forward_field, C)``) warped by
    ``backward_field``: the reconstructed atlas labels ``l_bar_s`` of Fig. 2.

    Equals ``warp(warp_one_hot(label_index, forward_field, C), backward_field)`` with the
    gradient of both fields, but takes the already warped map (its value only: the gradient
    through it reaches ``forward_field`` here, without a ``(voxels, channels)`` scatter).

    Returns:
        ``(batch, x, y, z, C)`` float32.
    """
    label_index = tf.cast(label_index, tf.int32)
    warped = tf.stop_gradient(tf.convert_to_tensor(warped, tf.float32))
    forward_field = tf.convert_to_tensor(forward_field, tf.float32)
    backward_field = tf.convert_to_tensor(backward_field, tf.float32)
    inner = _table(forward_field, forward_table)
    outer = _table(backward_field, backward_table)

    @tf.custom_gradient
    def _warp(forward_field, backward_field):
        def gradient(upstream):
            return _rewarp_backward(label_index, forward_field, backward_field, inner.index,
                                    inner.weight, outer.index, outer.weight, upstream)
        return _warp_forward(warped, outer.index, outer.weight), gradient

    return _warp(forward_field, backward_field)
