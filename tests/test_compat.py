"""The environment shims of ltnet_keras._compat: getargspec for neurite, Keras 2 via tf_keras."""
import inspect
import os
import sys

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest

from ltnet_keras import _compat


def _sample(a, b, c=3, *rest, d=4, **options):
    return a, b, c, rest, d, options


def _plain(x, y=1.5):
    return x, y


def test_getargspec_shim_matches_the_python_3_10_tuple():
    spec = _compat._getargspec(_sample)
    assert tuple(spec) == (["a", "b", "c"], "rest", "options", (3,))
    assert spec.args == ["a", "b", "c"]
    assert spec.varargs == "rest"
    assert spec.keywords == "options"
    assert spec.defaults == (3,)
    plain = _compat._getargspec(_plain)
    assert tuple(plain) == (["x", "y"], None, None, (1.5,))


def test_inspect_has_getargspec_after_import():
    assert hasattr(inspect, "getargspec")
    assert hasattr(inspect, "ArgSpec")
    spec = inspect.getargspec(_plain)
    assert spec.args == ["x", "y"] and spec.defaults == (1.5,)


def test_install_is_idempotent():
    before = inspect.getargspec
    _compat.install_getargspec_shim()
    assert inspect.getargspec is before


def test_neurite_imports():
    import neurite  # noqa: F401  (calls inspect.getargspec at import on Python >= 3.11)
    import voxelmorph  # noqa: F401


_DEFERRED_EXTRAS = """
import sys
import ltnet_keras
import numpy as np
import voxelmorph
import neurite.tf.utils.vae as vae
import neurite.py.plot as plot
print(int("sklearn" in sys.modules), int("matplotlib.pyplot" in sys.modules),
      int("mpl_toolkits.axes_grid1" in sys.modules))
# neurite's PCA helper still works: the real scikit-learn loads on the first call.
points = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
axis = vae.PCA(n_components=1).fit(points).components_[0]
print(round(abs(float(axis[0])), 2), round(abs(float(axis[1])), 2))
import sklearn.decomposition
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mpl_toolkits.axes_grid1 import make_axes_locatable
print(int(type(sklearn.decomposition).__name__ == "module"), int(plot.plt.figure is plt.figure))
divider = plot.make_axes_locatable(plt.figure().add_subplot())
print(type(divider).__name__, int(type(divider) is type(make_axes_locatable(plt.gca()))))
"""


def test_neurite_loads_without_its_unused_extras_and_gets_them_on_first_use():
    import subprocess
    out = subprocess.run([sys.executable, "-c", _DEFERRED_EXTRAS], capture_output=True,
                         text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=True)
    lines = out.stdout.split("\n")
    assert lines[0] == "0 0 0"        # no scikit-learn, pyplot, axes_grid1 with voxelmorph
    assert lines[1] == "0.71 0.71"    # the first principal axis of points along the diagonal
    assert lines[2] == "1 1"          # later imports are the real modules, shared with neurite
    assert lines[3] == "AxesDivider 1"   # neurite's make_axes_locatable is the real one


_DEFERRED_BY_TENSORFLOW = """
import sys
from ltnet_keras._compat import TENSORFLOW_DEFERRED, start_tensorflow_quietly
tf = start_tensorflow_quietly()
print(sum(name in sys.modules for name in TENSORFLOW_DEFERRED))
# What TensorFlow kept of them loads the real module on first use.
from tf_keras.src.engine import data_adapter
from tensorflow.lite.python import util
import pandas
print(int(data_adapter.pd.DataFrame is pandas.DataFrame),
      int(type(util.schema_fb.Model).__name__ == "type"),
      int(data_adapter._is_pandas_series(pandas.Series([1.0]))))
"""


def test_tensorflow_starts_without_pandas_and_tflite_schema_and_gets_them_on_first_use():
    import subprocess
    out = subprocess.run([sys.executable, "-c", _DEFERRED_BY_TENSORFLOW], capture_output=True,
                         text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=True)
    assert out.stdout.split("\n")[:2] == ["0", "1 1 1"], out.stdout


def test_stand_ins_leave_already_imported_modules_and_clean_up():
    before = sys.modules["os"]
    with _compat.stand_ins(("os", "ltnet_test_absent_module")):
        assert sys.modules["os"] is before
        stand_in = sys.modules["ltnet_test_absent_module"]
        factory = stand_in.anything
        assert callable(factory)
    assert "ltnet_test_absent_module" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="ltnet_test_absent_module"):
        factory()
    with pytest.raises(ModuleNotFoundError, match="ltnet_test_absent_module"):
        stand_in.anything


def test_generator_built_without_autograph_computes_what_voxelmorph_builds():
    import tensorflow as tf
    import voxelmorph as vxm
    from ltnet_keras.config import NetworkConfig
    from ltnet_keras.models.generators import make_generator
    network = NetworkConfig(enc_features=(8, 8), dec_features=(8, 8, 8))
    ours = make_generator((16, 16, 16), network, "ours")
    dense = vxm.networks.VxmDense((16, 16, 16), [[8, 8], [8, 8, 8]], int_steps=0)
    reference = tf.keras.Model(dense.inputs, dense.references.pos_flow)
    rng = np.random.default_rng(1)
    reference.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32)
                           for w in reference.get_weights()])
    ours.set_weights(reference.get_weights())
    pair = [rng.random((1, 16, 16, 16, 1), dtype=np.float32) for _ in range(2)]
    expected = reference(pair).numpy()
    assert float(np.abs(expected).max()) > 1e-3
    np.testing.assert_allclose(ours(pair).numpy(), expected, atol=1e-6)


_CACHED_PROGRAM = """
import sys
import ltnet_keras
from ltnet_keras._compat import start_tensorflow_quietly
tf = start_tensorflow_quietly()
def other_work(x):
    return x + 1.0
def sum_of_squares(x):
    return tf.reduce_sum(x * x)
if sys.argv[1] == "other-trace-first":
    tf.function(other_work)(tf.constant(1.0))
program = tf.function(sum_of_squares, jit_compile=True)
print(float(program(tf.range(4, dtype=tf.float32))))
"""


def test_a_cached_program_is_found_whatever_the_process_traced_before(tmp_path):
    """The persistent XLA cache keys programs by function name: with TensorFlow's process-wide
    counter in the names, a process that traced one other function first missed every program
    and stored it again. With names counted per function name it finds it: no new file."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}   # this process' cache
    env.update(LTNET_XLA_CACHE=str(tmp_path / "xla"), TF_CPP_MIN_LOG_LEVEL="3")
    files = []
    for history in ("nothing-first", "other-trace-first", "nothing-first"):
        out = subprocess.run([sys.executable, "-c", _CACHED_PROGRAM, history], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "14.0"
        files.append(sorted(p.name for p in (tmp_path / "xla").rglob("*.pb")))
    assert len(files[0]) == 1
    assert files[1] == files[0] and files[2] == files[0]


def test_stable_names_count_per_name_and_stay_unique():
    import tensorflow as tf
    from tensorflow.python.eager.polymorphic_function import concrete_function
    _compat.stable_function_names()
    _compat.stable_function_names()                   # installing twice changes nothing
    name = concrete_function._inference_name
    assert name.stable
    first, second = name("ltnet_test_fn"), name("ltnet_test_fn")
    assert first.startswith("__inference_ltnet_test_fn_s") and first != second
    assert int(second.rsplit("_s", 1)[1]) == int(first.rsplit("_s", 1)[1]) + 1
    # a traced function gets such a name, and two traces of one Python function two names
    square = tf.function(lambda x: x * x)
    names = {square.get_concrete_function(tf.TensorSpec(shape, tf.float32)).name.decode()
             for shape in ((2,), (3,))}
    assert len(names) == 2 and all("_s" in n for n in names)


def test_tf_keras_is_keras_2():
    import tensorflow as tf
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    assert tf.keras.layers.Dense.__module__.startswith("tf_keras"), tf.keras.layers.Dense.__module__
    import tf_keras
    assert tf.keras.Model is tf_keras.Model


def test_vxmdense_forward_through_the_pinned_stack():
    import tensorflow as tf
    import voxelmorph as vxm
    tf.keras.utils.set_random_seed(0)
    model = vxm.networks.VxmDense((32, 32, 32), [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]],
                                  int_steps=0)
    rng = np.random.default_rng(0)
    moving = rng.random((1, 32, 32, 32, 1), dtype=np.float32)
    fixed = rng.random((1, 32, 32, 32, 1), dtype=np.float32)
    warped, flow = model([moving, fixed])
    assert tuple(warped.shape) == (1, 32, 32, 32, 1)
    assert tuple(flow.shape) == (1, 32, 32, 32, 3)
    # voxelmorph initialises the flow convolution with N(0, 1e-5): the untrained field is ~0.
    assert float(np.abs(flow.numpy()).max()) < 1e-2
    assert np.all(np.isfinite(warped.numpy()))


def test_require_legacy_keras_raises_when_tensorflow_came_first(monkeypatch):
    assert "tensorflow" in sys.modules
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "0")
    with pytest.raises(RuntimeError, match="TF_USE_LEGACY_KERAS"):
        _compat.require_legacy_keras()
    monkeypatch.delenv("TF_USE_LEGACY_KERAS")
    with pytest.raises(RuntimeError):
        _compat.require_legacy_keras()
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    _compat.require_legacy_keras()  # already set: fine
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"


def test_require_legacy_keras_sets_the_variable_before_tensorflow(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.delenv("TF_USE_LEGACY_KERAS")
    _compat.require_legacy_keras()
    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"


def test_native_stderr_filter_drops_startup_noise_and_keeps_real_lines(capfd):
    """What C++ writes to file descriptor 2 inside the block: TensorFlow's start-up lines are
    dropped, anything else (a real error) still reaches the terminal, and stderr works after."""
    with _compat.native_stderr_filtered():
        for line in ("I0000 00:00:1796401412.842004    3839 port.cc:153] oneDNN custom operations "
                     "are on.",
                     "W0000 00:00:1796401413.1    1 cudart_stub.cc:31] Could not find cuda drivers",
                     "E0000 00:00:1796401414.6    1 cuda_platform.cc:52] failed call to cuInit: (303)",
                     "WARNING: All log messages before absl::InitializeLog() is called are "
                     "written to STDERR",
                     "Fatal: something real went wrong"):
            os.write(2, (line + "\n").encode())
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert err.splitlines() == ["Fatal: something real went wrong", "after the block"]


def test_native_stderr_filter_passes_everything_through_when_asked(capfd, monkeypatch):
    monkeypatch.setenv("LTNET_TF_LOG", "1")
    with _compat.native_stderr_filtered():
        os.write(2, b"I0000 00:00:1.0    1 port.cc:153] oneDNN custom operations are on.\n")
    assert "oneDNN" in capfd.readouterr().err


def test_tensorflow_log_level_respects_the_users_value(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    _compat.set_tensorflow_log_level()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    _compat.set_tensorflow_log_level()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"


def test_after_a_quiet_start_our_warnings_are_one_line_naming_the_file(monkeypatch):
    """The label-table warning of a FreeSurfer aseg reaches a command line user as one line
    that names the file, without Python's 'path:line: UserWarning' and source-code lines."""
    import warnings

    from ltnet_keras.data.labels import LabelTable
    # Python's default, whatever an earlier test's quiet start left in place.
    monkeypatch.setattr(warnings, "formatwarning", warnings._formatwarning_orig)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    table = LabelTable(ids=np.array([2, 3]), names=["a", "b"], structures=["a", "b"])
    with pytest.warns(UserWarning) as caught:
        table.restrict(np.array([[[0, 2, 3, 77, 77]]]), source="sub-09/aseg.mgz")
    shown = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename,
                                   caught[0].lineno)
    assert "UserWarning" in shown and "table.restrict(" in shown   # Python's default
    _compat.start_tensorflow_quietly()
    shown = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename,
                                   caught[0].lineno)
    assert shown == ("warning: sub-09/aseg.mgz: label ids [77] are not in the label table: "
                     "their 2 voxels are background\n")
