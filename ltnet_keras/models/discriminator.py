"""D: a 3D PatchGAN (Isola et al. 2017, extended to volumes) scoring image patches real/fake."""
import tensorflow as tf

from ltnet_keras.config import NetworkConfig


def _normalisation(kind: str, name: str):
    if kind == "instance":
        # GroupNormalization with one group per channel is instance normalisation.
        return tf.keras.layers.GroupNormalization(groups=-1, name=name)
    if kind == "batch":
        return tf.keras.layers.BatchNormalization(name=name)
    return None


def make_patchgan(inshape, network: NetworkConfig, name: str = "discriminator") -> tf.keras.Model:
    """``(batch, x, y, z, 1)`` image -> ``(batch, x', y', z', 1)`` map of patch scores.

    4x4x4 convolutions with stride 2 for every feature count but the last (stride 1), LeakyReLU
    0.2, normalisation after every convolution but the first (as in pix2pix), and a final 4x4x4
    convolution to one linear score per patch (least-squares GAN, so no sigmoid).
    """
    image = tf.keras.Input((*inshape, 1), name=f"{name}_image")
    x = image
    features = list(network.disc_features)
    for i, n_features in enumerate(features):
        stride = 1 if i == len(features) - 1 and len(features) > 1 else 2
        x = tf.keras.layers.Conv3D(n_features, 4, strides=stride, padding="same",
                                   name=f"{name}_conv{i}")(x)
        norm = _normalisation(network.disc_norm, f"{name}_norm{i}") if i else None
        if norm is not None:
            x = norm(x)
        x = tf.keras.layers.LeakyReLU(0.2, name=f"{name}_lrelu{i}")(x)
    scores = tf.keras.layers.Conv3D(1, 4, padding="same", name=f"{name}_scores")(x)
    return tf.keras.Model(image, scores, name=name)
