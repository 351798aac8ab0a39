"""The label transfer's XLA programs: :mod:`.transfer`'s pieces compiled, traced once per
machine (:func:`~ltnet_keras.inference.programs.stored_program`). The field (or where a chunk
of scan voxels samples the atlas) is one program and the 8-corner label vote another: compiled
as one, XLA worked the field's interpolation out again inside each of the vote's look-ups.

``factor``: the field's grid (the network's, or refinement's finer one) on the crop, and
``method`` (``nearest`` / ``linear``) are Python values: each gets its own program.
"""
import tensorflow as tf

from ltnet_keras.inference.programs import compiled
from ltnet_keras.inference.transfer import (field_at_points, field_to_grid, sampling_grid,
                                            warp_labels_tf)

__all__ = ["TRANSFER_CHUNK", "labels_on_grid", "field_on_grid", "labels_at_field",
           "labels_through", "positions_through", "labels_at_positions"]

#: Scan voxels per call of :func:`labels_through`: a fixed size compiles once for every scan
#: shape and bounds the memory of the 8-corner vote (~100 MB a chunk).
TRANSFER_CHUNK = 1 << 20


def labels_on_grid(atlas_labels, field_network, original_shape, crop_start, offset, factor,
                   method):
    """Atlas labels on the scan's own grid ``original_shape`` through the field of its crop
    (which starts at ``crop_start``); ``offset``: between the atlas' and the scan's crops.
    Returns ``(labels, the field on the scan's grid)``, two programs: compiled together, XLA
    worked the field's up-sampling out again inside each of the vote's 8 look-ups (0.19-0.22 s
    against 0.07 s at 160x192x160, the same labels)."""
    forward_field = field_on_grid(field_network, original_shape, crop_start, factor)
    return labels_at_field(atlas_labels, forward_field, offset, method), forward_field


@compiled
def field_on_grid(field_network, original_shape, crop_start, factor):
    """The field brought to the scan's own grid, ``(X, Y, Z, 3)`` in its voxels."""
    return field_to_grid(field_network, original_shape, crop_start, factor)


@compiled
def labels_at_field(atlas_labels, forward_field, offset, method):
    """Atlas labels pulled by a field ``(X, Y, Z, 3)`` on the scan's grid (Eq. 2)."""
    return warp_labels_tf(atlas_labels, sampling_grid(forward_field.shape[:3]) + forward_field
                          + offset, method)


def labels_through(atlas_labels, field_network, scan_to_atlas, box_start, box_shape, first,
                   crop_start, offset, factor, method):
    """One chunk of scan voxels (flat indices ``first + [0, TRANSFER_CHUNK)`` into the box
    ``box_start + [0, box_shape)``): scan voxel -> atlas-grid point (``scan_to_atlas``, the
    inverse affine) -> + forward field -> atlas labels. Two programs, as in
    :func:`labels_on_grid`."""
    positions = positions_through(field_network, scan_to_atlas, box_start, box_shape, first,
                                  crop_start, offset, factor)
    return labels_at_positions(atlas_labels, positions, method)


@compiled
def positions_through(field_network, scan_to_atlas, box_start, box_shape, first, crop_start,
                      offset, factor):
    """Where one chunk of scan voxels (:func:`labels_through`) samples the atlas' labels."""
    flat = tf.minimum(first + tf.range(TRANSFER_CHUNK, dtype=tf.int32),
                      tf.reduce_prod(box_shape) - 1)
    k = flat % box_shape[2]
    j = (flat // box_shape[2]) % box_shape[1]
    i = flat // (box_shape[1] * box_shape[2])
    voxels = tf.cast(tf.stack([i, j, k], -1) + box_start, tf.float32)
    points = tf.linalg.matvec(scan_to_atlas[:3, :3], voxels) + scan_to_atlas[:3, 3]
    return points + field_at_points(field_network, points, crop_start, factor) + offset


@compiled
def labels_at_positions(atlas_labels, positions, method):
    """Atlas labels at atlas-grid ``positions`` ``(..., 3)`` (Eq. 2)."""
    return warp_labels_tf(atlas_labels, positions, method)
