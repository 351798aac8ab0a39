"""ltnet-keras: LT-Net (Wang et al., CVPR 2020) one-shot atlas-based segmentation in tf.keras.

Importing the package prepares the environment (Keras 2 through ``tf.keras``, neurite's
``getargspec``, neurite's unused extras loaded on first use) before anything imports
TensorFlow; TensorFlow itself is only imported by the modules that need it, so data handling
and evaluation stay quick to start.
"""
from ltnet_keras._compat import (defer_neurite_extras, enable_onednn, enable_xla_cache,
                                 install_getargspec_shim, require_legacy_keras)

require_legacy_keras()
enable_onednn()
enable_xla_cache()
install_getargspec_shim()
defer_neurite_extras()

__version__ = "0.1.0"
