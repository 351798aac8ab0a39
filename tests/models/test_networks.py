"""G_F / G_B (voxelmorph U-Nets), the PatchGAN D, and which networks LTNet builds per preset."""
import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.config import ExperimentConfig, NetworkConfig, apply_preset
from ltnet_keras.models.discriminator import make_patchgan
from ltnet_keras.models.generators import make_generator, make_warp
from ltnet_keras.models.ltnet import LTNet

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def generator():
    tf.keras.utils.set_random_seed(0)
    return make_generator((32, 32, 32), NetworkConfig(), "forward_generator")


def test_generator_output_is_a_field(generator):
    rng = np.random.default_rng(0)
    moving = rng.random((2, 32, 32, 32, 1), dtype=np.float32)
    fixed = rng.random((2, 32, 32, 32, 1), dtype=np.float32)
    field = generator([moving, fixed]).numpy()
    assert field.shape == (2, 32, 32, 32, 3)
    assert np.all(np.isfinite(field))
    assert len(generator.inputs) == 2
    assert tuple(generator.inputs[0].shape) == (None, 32, 32, 32, 1)


def test_generator_is_voxelmorphs_unet(generator):
    names = [layer.name for layer in generator.layers]
    assert any("unet" in n for n in names), names
    assert names[-1] == "forward_generator_flow"
    # the U-Net features of the config: 4 encoder levels, 16 then 32 features
    convs = [l for l in generator.layers if isinstance(l, tf.keras.layers.Conv3D)]
    enc = [l.filters for l in convs if "enc_conv" in l.name]
    assert enc == [16, 32, 32, 32]
    # voxelmorph's flow layer: 3 outputs initialised N(0, 1e-5)
    flow = generator.get_layer("forward_generator_flow")
    assert flow.filters == 3
    assert float(np.abs(flow.get_weights()[0]).max()) < 1e-3


def test_generator_feature_config_is_used():
    network = NetworkConfig(enc_features=[8, 8, 8, 8], dec_features=[8, 8, 8, 8, 8, 8, 4])
    small = make_generator(SHAPE, network, "g")
    default = make_generator(SHAPE, NetworkConfig(), "g2")
    assert small.count_params() < default.count_params()


def test_warp_is_voxelmorphs_spatial_transformer():
    import voxelmorph as vxm
    warp = make_warp("linear")
    assert isinstance(warp, vxm.layers.SpatialTransformer)
    image = np.arange(16 ** 3, dtype=np.float32).reshape((1,) + SHAPE + (1,))
    field = np.zeros((1,) + SHAPE + (3,), np.float32)
    field[..., 0] = 1.0  # pull from x + 1
    warped = warp([image, field]).numpy()
    np.testing.assert_allclose(warped[0, :-1, ..., 0], image[0, 1:, ..., 0])
    # border value repeated (fill_value=None), not zero
    np.testing.assert_allclose(warped[0, -1, ..., 0], image[0, -1, ..., 0])


@pytest.mark.parametrize("inshape", [(32, 32, 32), (32, 48, 32)])
def test_patchgan_gives_a_patch_map(inshape):
    network = NetworkConfig(disc_features=[16, 32, 64, 128])
    disc = make_patchgan(inshape, network)
    scores = disc(np.zeros((2,) + inshape + (1,), np.float32)).numpy()
    assert scores.shape == (2,) + tuple(s // 8 for s in inshape) + (1,)
    norms = [l for l in disc.layers if isinstance(l, tf.keras.layers.GroupNormalization)]
    assert len(norms) == 3  # every convolution but the first


def test_patchgan_without_normalisation():
    disc = make_patchgan(SHAPE, NetworkConfig(disc_norm="none"))
    assert not any(isinstance(l, (tf.keras.layers.GroupNormalization,
                                  tf.keras.layers.BatchNormalization)) for l in disc.layers)


@pytest.mark.parametrize("preset, backward, discriminator", [
    ("voxelmorph", False, False),
    ("gan", False, True),
    ("gan_cyc", True, True),
    ("ltnet", True, True),
])
def test_ltnet_builds_only_the_networks_its_terms_need(preset, backward, discriminator):
    config = apply_preset(ExperimentConfig(), preset)
    model = LTNet(SHAPE, config.network, config.weights)
    assert model.forward_generator is not None
    assert (model.backward_generator is not None) is backward
    assert (model.discriminator is not None) is discriminator
    tracked = {m.name for m in model.metrics}
    assert tracked == (set(model.term_weights) | {"total", "field_magnitude"}
                       | ({"discriminator"} if discriminator else set()))
    generator_params = sum(int(np.prod(v.shape)) for v in model.generator_variables)
    single = model.forward_generator.count_params()
    assert generator_params == (2 * single if backward else single)
