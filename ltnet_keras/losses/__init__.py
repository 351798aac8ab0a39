"""The losses of Eq. (3)-(11): ``equations`` holds one function per equation, ``fused`` the
fast paths of the label-space terms (same values, hand-written gradients).

The equations are re-exported here, so ``ltnet_keras.losses.similarity_loss`` works as before.
"""
from ltnet_keras.losses.equations import (EQ11_WEIGHTS, TERM_NAMES, anatomy_cycle_loss,  # noqa: F401
                                          anatomy_difference_loss, charbonnier, compose_fields,
                                          image_cycle_loss, local_ncc, lsgan_discriminator_loss,
                                          lsgan_generator_loss, similarity_loss, smoothness_loss,
                                          total_generator_loss, transformation_consistency_loss)
