"""G_F and G_B: VoxelMorph 0.2 U-Nets that map (moving, fixed) to a displacement field.

Fields follow voxelmorph's convention ``warped(t) = moving(t + field(t))`` in voxel units.
"""
import tensorflow as tf
import voxelmorph as vxm
# Keras converts each subclassed layer's ``call`` with AutoGraph while it builds a functional
# model; there is no public switch for that.
from tensorflow.python.autograph.core import ag_ctx

from ltnet_keras.config import NetworkConfig


def make_generator(inshape, network: NetworkConfig, name: str) -> tf.keras.Model:
    """A ``VxmDense`` registration network reduced to its field output.

    Inputs ``[moving, fixed]``, each ``(batch, x, y, z, 1)``; output ``(batch, x, y, z, 3)``.
    ``network.int_steps = 0`` gives a plain displacement field (the paper); more steps integrate
    a stationary velocity field (diffeomorphic variant).

    Built without AutoGraph: voxelmorph's layers branch on Python values only, so the graph is
    the same, and converting their source (the ``SpatialTransformer``'s above all) cost ~1 s
    of every command's start-up.
    """
    with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
        dense = vxm.networks.VxmDense(
            tuple(inshape),
            [list(network.enc_features), list(network.dec_features)],
            int_steps=network.int_steps,
            name=name,
        )
    return tf.keras.Model(dense.inputs, dense.references.pos_flow, name=name)


def make_warp(interp_method: str = "linear", name=None) -> tf.keras.layers.Layer:
    """voxelmorph's ``SpatialTransformer``: call as ``warp([moving, field])``.

    Outside the volume it repeats the border value (``fill_value=None``) so that warped images
    have no artificial black rim the similarity loss would have to explain.
    """
    return vxm.layers.SpatialTransformer(interp_method=interp_method, indexing="ij",
                                         fill_value=None, name=name)
