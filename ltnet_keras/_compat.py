"""Environment fixes that must run before TensorFlow or neurite are imported.

* ``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` the Keras 2 (``tf_keras``) implementation that
  voxelmorph/neurite 0.2 are written against. Standalone Keras 3 layers applied to tf_keras
  tensors build but silently never train, so the whole project stays on ``tf.keras``.
* neurite 0.2 calls ``inspect.getargspec``, which Python 3.11 removed.
* ``TF_ENABLE_ONEDNN_OPTS=1``: the pinned TensorFlow CPU build leaves oneDNN off, and its own
  Conv3D filter gradients are 10-100x slower (measured by ``benchmarks/speed.py``).
* The ``ltnet`` command starts TensorFlow through :func:`start_tensorflow_quietly`, so its C++
  start-up log (oneDNN notice, CUDA probe, absl preamble) stays out of the user's terminal.
* Compiled XLA programs (refinement, label transfer) are kept on disk between processes
  (:func:`enable_xla_cache`), so a machine pays for compiling them once, not every process;
  :func:`stable_function_names` lets a process find them whatever it traced before.
* neurite imports scikit-learn and matplotlib's plotting when it loads, for helpers ltnet never
  calls; :func:`defer_neurite_extras` makes them load on neurite's first use instead (~0.8 s
  of every command that starts a network).
"""
import contextlib
import importlib
import importlib.abc
import importlib.util
import inspect
import os
import re
import sys
import tempfile
import types
import warnings


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


#: TensorFlow's flag for its on-disk cache of compiled XLA programs (read from TF_XLA_FLAGS).
XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def _cpu_key() -> str:
    """What compiled CPU code depends on: the architecture and the CPU's instruction-set
    flags (a home folder shared by cluster nodes of several CPU generations must not hand
    AVX-512 code to a node without it)."""
    import hashlib
    import platform
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:10]}"


def xla_cache_dir():
    """Where compiled XLA programs are kept: ``$LTNET_XLA_CACHE`` (a folder; ``off`` for none),
    else ``~/.cache/ltnet-keras/xla``; inside it one folder per TensorFlow version, package
    version and CPU (:func:`_cpu_key`), so a new version or another CPU never reads a program
    compiled for the old one. XLA keys each program by its own fingerprint (shapes included)."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path
    setting = os.environ.get("LTNET_XLA_CACHE", "")
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    root = Path(setting).expanduser() if setting else Path.home() / ".cache" / "ltnet-keras" / "xla"
    try:
        versions = f"tf{version('tensorflow')}-ltnet{version('ltnet-keras')}"
    except PackageNotFoundError:
        versions = "unversioned"
    return root / f"{versions}-{_cpu_key()}"


def enable_xla_cache():
    """Point TensorFlow's persistent XLA cache at :func:`xla_cache_dir` (no effect once
    TensorFlow is loaded, when the cache is off, or when TF_XLA_FLAGS already sets it)."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    folder = xla_cache_dir()
    if "tensorflow" in sys.modules or folder is None or XLA_CACHE_FLAG in flags:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return   # a read-only home: compile in every process, as without the cache
    os.environ["TF_XLA_FLAGS"] = f"{flags} {XLA_CACHE_FLAG}={folder}".strip()


#: What neurite imports at start-up only for helpers ltnet does not use: scikit-learn's PCA
#: (its VAE tools; scikit-learn with scipy.stats and joblib is ~0.5 s), pyplot and
#: axes_grid1 (its plots and callbacks, ~0.3 s).
NEURITE_DEFERRED = ("sklearn.decomposition", "matplotlib.pyplot", "mpl_toolkits.axes_grid1")


class _DeferredAttribute:
    """What ``from module import name`` gives while ``module`` is a stand-in: calling it
    imports the real module and calls the real ``name``."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)

    def __repr__(self):
        return f"<{self.module}.{self.name}, imported on first call>"


class _DeferredModule(types.ModuleType):
    """Stands in for a module while neurite loads (``loading``); afterwards every attribute
    read imports the real module, which the stand-in no longer hides in ``sys.modules``."""

    def __init__(self, name: str):
        super().__init__(name)
        self.loading = True

    def __getattr__(self, attribute):
        if attribute.startswith("__"):      # the import system probing (__path__, __spec__)
            raise AttributeError(attribute)
        if self.loading:
            return _DeferredAttribute(self.__name__, attribute)
        return getattr(importlib.import_module(self.__name__), attribute)


@contextlib.contextmanager
def stand_ins(names):
    """Within the block, each module of ``names`` not yet imported is a :class:`_DeferredModule`
    in ``sys.modules``; afterwards the real module is imported wherever it is first used."""
    placed = {name: _DeferredModule(name) for name in names if name not in sys.modules}
    sys.modules.update(placed)
    try:
        yield
    finally:
        for name, stand_in in placed.items():
            stand_in.loading = False
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


class _ExtrasDeferredLoader(importlib.abc.Loader):
    """neurite's own loader, run with :data:`NEURITE_DEFERRED` as stand-ins."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with stand_ins(NEURITE_DEFERRED):
            self.loader.exec_module(module)


class _NeuriteFinder(importlib.abc.MetaPathFinder):
    """Finds neurite as the other finders do, once, and hands it the deferring loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "neurite":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ExtrasDeferredLoader(spec.loader)
        return spec


def defer_neurite_extras():
    """Load :data:`NEURITE_DEFERRED` on neurite's first use of them, not when neurite loads
    (no effect once neurite is imported)."""
    if "neurite" not in sys.modules and not any(isinstance(f, _NeuriteFinder)
                                                for f in sys.meta_path):
        sys.meta_path.insert(0, _NeuriteFinder())


def stable_function_names():
    """Name each traced tf.function ``__inference_<name>_s<k>``, ``k`` counting this process'
    traces of that name, instead of TensorFlow's process-wide counter. TensorFlow keys a
    program in the persistent XLA cache by its function's name, so with the counter a program
    was found again only after the very same sequence of traces (measured: one other
    tf.function traced first, and every refinement program was compiled again, 2.0 -> 5.7 s,
    and stored anew). Names stay unique within the process. No effect (names as TensorFlow
    makes them) on a TensorFlow without this hook."""
    import collections
    import threading
    from tensorflow.python.eager.polymorphic_function import concrete_function
    current = getattr(concrete_function, "_inference_name", None)
    prefix = getattr(concrete_function, "_INFERENCE_PREFIX", None)
    if current is None or prefix is None or getattr(current, "stable", False):
        return
    counts, lock = collections.Counter(), threading.Lock()

    def inference_name(name):
        with lock:
            counts[name] += 1
            return f"{prefix}{name}_s{counts[name]}"

    inference_name.stable = True
    concrete_function._inference_name = inference_name


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


#: Lines TensorFlow's C++ runtime and absl write to stderr while TensorFlow loads and finds
#: its devices: the oneDNN notice, "Could not find cuda drivers", the cuInit failure on a
#: machine without a GPU, CPU-feature notes. None of them is about the user's data.
_STARTUP_NOISE = re.compile(
    r"^([IW]\d{4} \d\d:\d\d:\d\d"              # absl INFO/WARNING lines (I0000 ..., W0000 ...)
    r"|E\d{4} .*(cuInit|cuda|CUDA|TensorRT)"   # the GPU probe failing on a CPU machine
    r"|WARNING: All log messages before absl::InitializeLog"
    r"|To enable the following instructions:"
    r"|.*oneDNN custom operations are on)")

#: Python warnings raised inside these packages are about their own internals (deprecations
#: between TensorFlow, Keras and neurite versions), not about anything a user can change.
_THIRD_PARTY_WARNINGS = r"(tensorflow|tf_keras|keras|neurite|voxelmorph|absl|h5py|ants|google)"


def set_tensorflow_log_level(level: str = "3"):
    """``TF_CPP_MIN_LOG_LEVEL`` for TensorFlow's C++ log, unless the user set one; no effect
    once TensorFlow is loaded. 3 also hides C++ ERROR lines: during training grappler logs
    failed graph rewrites as errors ("remapper failed") that change nothing for the user, and
    a real failure reaches Python as an exception with its message anyway."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", level)


@contextlib.contextmanager
def native_stderr_filtered(noise=_STARTUP_NOISE):
    """Run the block with the process' stderr (file descriptor 2, where C++ writes) captured;
    afterwards every captured line that is not start-up ``noise`` is written to stderr, so an
    error raised in the block still reaches the user. Set ``LTNET_TF_LOG=1`` to see it all."""
    if os.environ.get("LTNET_TF_LOG") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines()
                    if line.strip() and not noise.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def _one_line_warning(message, category, filename, lineno, line=None):
    """What is left after the filters is ours and names its file: the source line Python
    adds would only say where in the package the warning was raised."""
    return f"warning: {message}\n"


#: Modules TensorFlow imports at its own import but uses only to train on pandas data (tf_keras'
#: data adapter) or to convert to TF Lite: 0.3 and 0.13 s of every start.
TENSORFLOW_DEFERRED = ("pandas", "tensorflow.lite.python.schema_py_generated")


def start_tensorflow_quietly():
    """Import TensorFlow and let it find its devices with the start-up noise filtered out, and
    keep TensorFlow's, absl's and third-party Python warnings out of the terminal: a command
    line user sees progress, results and real errors. Returns the ``tensorflow`` module."""
    set_tensorflow_log_level()
    warnings.filterwarnings("ignore", module=_THIRD_PARTY_WARNINGS)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = _one_line_warning
    with native_stderr_filtered(), stand_ins(TENSORFLOW_DEFERRED):
        import tensorflow as tf
        tf.config.list_physical_devices()
    stable_function_names()
    tf.get_logger().setLevel("ERROR")
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl comes with TensorFlow; without it there is nothing to quiet
        pass
    return tf


def end_process_now(status: int) -> None:
    """End the process with ``status`` at once, its standard streams flushed: for a process
    whose outputs are all written and closed. Python's teardown of TensorFlow (unloading its
    ~3000 modules, stopping its threads) takes ~0.55 s (issue 28: a tenth of a one-scan
    command)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
