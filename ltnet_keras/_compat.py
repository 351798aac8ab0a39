"""Environment fixes that must run before TensorFlow or neurite are imported.

* ``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` the Keras 2 (``tf_keras``) implementation that
  voxelmorph/neurite 0.2 are written against. Standalone Keras 3 layers applied to tf_keras
  tensors build but silently never train, so the whole project stays on ``tf.keras``.
* neurite 0.2 calls ``inspect.getargspec``, which Python 3.11 removed.
* ``TF_ENABLE_ONEDNN_OPTS=1``: the pinned TensorFlow CPU build leaves oneDNN off, and its own
  Conv3D filter gradients are 10-100x slower (measured by ``benchmarks/speed.py``).
"""
import inspect
import os
import sys


def require_legacy_keras():
    """Set ``TF_USE_LEGACY_KERAS=1``; fail loudly if TensorFlow was already imported without it."""
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError(
            "TensorFlow was imported before ltnet_keras without TF_USE_LEGACY_KERAS=1, so tf.keras "
            "is Keras 3 and voxelmorph 0.2 cannot train. Import ltnet_keras first or export "
            "TF_USE_LEGACY_KERAS=1.")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def enable_onednn():
    """Use oneDNN kernels on CPU unless the user chose otherwise (no effect once TF is loaded)."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _getargspec(func):
    """``inspect.getargspec`` rebuilt on ``getfullargspec`` (same 4-tuple as Python <= 3.10)."""
    spec = inspect.getfullargspec(func)
    return inspect.ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)


def install_getargspec_shim():
    """Give ``inspect`` a ``getargspec`` (and ``ArgSpec``) when the interpreter lacks them."""
    if not hasattr(inspect, "ArgSpec"):
        from collections import namedtuple
        inspect.ArgSpec = namedtuple("ArgSpec", "args varargs keywords defaults")
    if not hasattr(inspect, "getargspec"):
        inspect.getargspec = _getargspec
