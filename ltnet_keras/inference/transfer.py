"""Label transfer on a scan's own grid: the network-grid forward field brought to full
resolution, and the atlas' labels (or image) sampled at the positions it points to (Eq. 2).

``positions`` are ``(..., 3)`` float arrays of atlas-grid voxel coordinates, one per output
voxel; labels are warped either ``nearest`` or ``linear`` (trilinear one-hot vote from the 8
neighbours, then arg-max).
"""
import numpy as np

from ltnet_keras.config import SEGMENT_INTERPOLATIONS

def _check_method(method):
    if method not in SEGMENT_INTERPOLATIONS:
        raise ValueError(f"unknown label interpolation {method!r}; valid: "
                         f"{', '.join(SEGMENT_INTERPOLATIONS)}")


def _axis_interpolation(n_out, crop_start, n_network, factor):
    """Where each original voxel along one axis falls between network block centres."""
    import tensorflow as tf
    cropped = tf.range(n_out, dtype=tf.float32) - tf.cast(crop_start, tf.float32)
    f = tf.cast(factor, tf.float32)
    # Network voxel i covers cropped voxels [i f, (i + 1) f): its centre is i f + (f - 1) / 2.
    q = tf.clip_by_value((cropped - (f - 1.0) / 2.0) / f, 0.0, tf.cast(n_network - 1, tf.float32))
    lower = tf.minimum(tf.cast(tf.floor(q), tf.int32), tf.maximum(n_network - 2, 0))
    upper = tf.minimum(lower + 1, n_network - 1)
    weight = q - tf.cast(lower, tf.float32)
    inside = tf.logical_and(cropped >= 0.0, cropped < f * tf.cast(n_network, tf.float32))
    return lower, upper, weight, inside


def field_to_grid(field, original_shape, crop_start, factor):
    """Network-grid field ``(x, y, z, 3)`` -> ``(X, Y, Z, 3)`` in original voxels (TF).

    The same mapping as :meth:`GridSpec.field_to_original`: linear between block centres,
    scaled by ``factor``, zero outside the crop; written as three separable 1D interpolations
    so it runs in the same graph as the label warp.
    """
    import tensorflow as tf
    out = field
    inside_masks = []
    for axis in range(3):
        lower, upper, weight, inside = _axis_interpolation(
            original_shape[axis], crop_start[axis], tf.shape(field)[axis], factor)
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        weight = tf.reshape(weight, shape)
        out = (tf.gather(out, lower, axis=axis) * (1.0 - weight)
               + tf.gather(out, upper, axis=axis) * weight)
        inside_masks.append(tf.reshape(tf.cast(inside, tf.float32), shape))
    mask = inside_masks[0] * inside_masks[1] * inside_masks[2]
    return out * tf.cast(factor, tf.float32) * mask


def field_at_points(field, points, crop_start, factor):
    """Network-grid field ``(x, y, z, 3)`` at continuous original-grid ``points`` ``(N, 3)``
    -> ``(N, 3)`` in original voxels (TF): :func:`field_to_grid` at arbitrary points (the
    same trilinear interpolation between block centres, zero outside the crop)."""
    import tensorflow as tf
    f = tf.cast(factor, tf.float32)
    size = tf.shape(field)[:3]
    top = tf.cast(size - 1, tf.float32)
    cropped = points - tf.cast(crop_start, tf.float32)
    q = tf.clip_by_value((cropped - (f - 1.0) / 2.0) / f, 0.0, top)
    lower = tf.minimum(tf.cast(tf.floor(q), tf.int32), tf.maximum(size - 2, 0))
    upper = tf.minimum(lower + 1, size - 1)
    weight = q - tf.cast(lower, tf.float32)
    out = 0.0
    for corner in range(8):
        pick = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        index = tf.stack([upper[..., a] if pick[a] else lower[..., a] for a in range(3)], -1)
        corner_weight = 1.0
        for a in range(3):
            corner_weight *= weight[..., a] if pick[a] else 1.0 - weight[..., a]
        out += tf.gather_nd(field, index) * corner_weight[..., None]
    inside = tf.reduce_all((cropped >= 0.0) & (cropped < f * tf.cast(size, tf.float32)), -1)
    return out * f * tf.cast(inside, tf.float32)[..., None]


def sampling_grid(shape):
    """``(X, Y, Z, 3)`` voxel coordinates of a grid (the identity transform)."""
    import tensorflow as tf
    axes = [tf.range(shape[i], dtype=tf.float32) for i in range(3)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def warp_labels_tf(label_map, positions, method="linear"):
    """Eq. (2) for a label map in TF: ``out[t] = label_map(positions[t])``, clamped at borders.

    ``"nearest"`` takes the closest voxel. ``"linear"`` is trilinear interpolation of the
    one-hot map followed by argmax, computed exactly from the 8 surrounding voxels (a label's
    interpolated value is the summed weight of the corners carrying it) without materialising
    a one-hot volume of every label.
    """
    import tensorflow as tf
    _check_method(method)
    upper_bound = tf.cast(tf.shape(label_map) - 1, tf.float32)
    positions = tf.clip_by_value(positions, 0.0, upper_bound)
    if method == "nearest":
        return tf.gather_nd(label_map, tf.cast(tf.round(positions), tf.int32))
    lower = tf.floor(positions)
    frac = positions - lower
    lower = tf.cast(lower, tf.int32)
    top = tf.shape(label_map) - 1
    corner_labels, corner_weights = [], []
    for corner in range(8):
        offset = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
        index = tf.minimum(lower + tf.constant(offset, tf.int32), top)
        corner_labels.append(tf.gather_nd(label_map, index))
        weight = 1.0
        for axis in range(3):
            weight *= frac[..., axis] if offset[axis] else 1.0 - frac[..., axis]
        corner_weights.append(weight)
    best_label, best_score = corner_labels[0], tf.fill(tf.shape(corner_weights[0]), -1.0)
    for k in range(8):
        score = tf.add_n([tf.where(tf.equal(corner_labels[j], corner_labels[k]),
                                   corner_weights[j], 0.0) for j in range(8)])
        better = score > best_score
        best_label = tf.where(better, corner_labels[k], best_label)
        best_score = tf.where(better, score, best_score)
    return best_label


def warp_label_map(label_map, positions, method="linear") -> np.ndarray:
    """numpy front end of :func:`warp_labels_tf`: ``positions`` ``(..., 3)`` in voxels of
    ``label_map``; returns a label map of shape ``positions.shape[:-1]`` with its dtype."""
    import tensorflow as tf
    _check_method(method)
    label_map = np.asarray(label_map)
    warped = warp_labels_tf(tf.constant(label_map.astype(np.int32)),
                            tf.constant(np.asarray(positions, dtype=np.float32)), method)
    return warped.numpy().astype(label_map.dtype)


def warp_image(image, positions) -> np.ndarray:
    """Trilinear ``image(positions)`` (the warped atlas, Eq. 1, on the scan's grid)."""
    from scipy.ndimage import map_coordinates
    coords = np.moveaxis(np.asarray(positions, dtype=np.float32), -1, 0)
    return map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)
