"""Traced programs kept on disk (ltnet_keras.inference.programs): what a later process runs is
the program an earlier one traced, for the same key only, and a damaged file is replaced."""
import os
import subprocess
import sys

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.inference import programs


def _weighted_sum(x, y, power):
    return tf.reduce_sum(x * y ** power), x - y


def _program(fn=_weighted_sum):
    """A fresh wrapper (nothing in memory) and a count of its traces."""
    traced = tf.function(fn, jit_compile=True, autograph=False)
    count = {"traces": 0}
    original = traced.get_concrete_function

    class Counting:
        python_function = traced.python_function

        def get_concrete_function(self, *args):
            count["traces"] += 1
            return original(*args)

        def __call__(self, *args):
            return traced(*args)

    return programs.stored_program(Counting()), count


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "program_store", lambda: tmp_path / "programs")
    return tmp_path / "programs"


def _arrays(shape=(2, 3)):
    rng = np.random.default_rng(0)
    return (rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32))


def test_a_stored_program_computes_what_the_function_does_and_is_read_back(store):
    x, y = _arrays()
    first, count = _program()
    total, difference = first(x, y, 2)
    assert count["traces"] == 1 and len(list(store.glob("*.pb"))) == 1
    np.testing.assert_allclose(float(total), float(np.sum(x * y ** 2)), rtol=1e-6)
    np.testing.assert_allclose(difference.numpy(), x - y, rtol=1e-6)
    again, count_again = _program()          # nothing in its memory: the file is read
    total_again, difference_again = again(x, y, 2)
    assert count_again["traces"] == 0
    assert float(total_again) == float(total)
    assert np.array_equal(difference_again.numpy(), difference.numpy())


def test_each_shape_python_value_and_source_gets_its_own_program(store, monkeypatch):
    program, count = _program()
    x, y = _arrays()
    program(x, y, 2)
    program(x, y, 2)                          # the same key: from memory
    assert count["traces"] == 1
    program(x, y, 3)                          # another Python value is another program
    program(*_arrays((4,)), 2)                # another shape
    names = sorted(p.name for p in store.glob("*.pb"))
    assert count["traces"] == 3 and len(names) == 3
    monkeypatch.setattr(programs, "source_digest", lambda: "an edited package")
    edited, count_edited = _program()
    total, _ = edited(x, y, 3)
    assert count_edited["traces"] == 1         # nothing stored before the edit is used
    assert len(list(store.glob("*.pb"))) == 4
    np.testing.assert_allclose(float(total), float(np.sum(x * y ** 3)), rtol=1e-6)


def test_a_damaged_file_is_traced_again_and_replaced(store):
    x, y = _arrays()
    program, _ = _program()
    expected = program(x, y, 2)[1].numpy()
    (path,) = store.glob("*.pb")
    path.write_bytes(path.read_bytes()[:40])  # cut short, as by a killed process
    again, count = _program()
    assert np.array_equal(again(x, y, 2)[1].numpy(), expected)
    assert count["traces"] == 1
    reread, count_reread = _program()
    assert np.array_equal(reread(x, y, 2)[1].numpy(), expected)
    assert count_reread["traces"] == 0         # the replaced file is whole


def test_a_program_that_captures_a_tensor_is_not_stored(store):
    captured = tf.constant([1.0, 2.0, 3.0])
    program, _ = _program(lambda x: x * captured)
    np.testing.assert_allclose(program(np.ones(3, np.float32)).numpy(), [1.0, 2.0, 3.0])
    assert not store.exists() or not list(store.glob("*.pb"))


def test_inside_a_trace_it_is_the_function_itself_and_gradients_flow(store):
    square, _ = _program(lambda x: x * x)

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(square(x))
        return tape.gradient(y, x)

    np.testing.assert_allclose(gradient(tf.constant([1.0, -2.0])).numpy(), [2.0, -4.0])


_FRESH_PROCESS = """
import numpy as np
import ltnet_keras
from ltnet_keras._compat import start_tensorflow_quietly
tf = start_tensorflow_quietly()
from tensorflow.python.eager.polymorphic_function import tracing_compilation
from ltnet_keras.inference import refine
traces = []
original = tracing_compilation._create_concrete_function
tracing_compilation._create_concrete_function = lambda *a: traces.append(1) or original(*a)
image = np.linspace(0.0, 1.0, 4 * 6 * 4, dtype=np.float32).reshape(4, 6, 4)
table = refine._corner_table(image)
print(len(traces), float(tf.reduce_sum(table)))
"""


def test_a_fresh_process_runs_the_stored_program_without_tracing(tmp_path):
    """The refinement's own programs: the first process traces and stores, the next one
    traces nothing and computes the same numbers."""
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    env.update(LTNET_XLA_CACHE=str(tmp_path / "xla"), TF_CPP_MIN_LOG_LEVEL="3")
    printed = [subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env,
                              capture_output=True, text=True, check=True).stdout.split()
               for _ in range(2)]
    assert printed[0][0] == "1" and printed[1][0] == "0"
    assert printed[1][1] == printed[0][1]
    assert list((tmp_path / "xla").rglob("programs/*.pb"))


_WEIGHTS = {"variable": None}


def _scaled(x):
    return x * _WEIGHTS["variable"]


def test_a_frozen_program_keeps_the_weights_it_was_traced_with_under_its_salt(store):
    _WEIGHTS["variable"] = tf.Variable([2.0, 3.0])
    first = programs.stored_program(tf.function(_scaled), freeze=True, salt="weights A")
    np.testing.assert_allclose(first(np.ones(2, np.float32)).numpy(), [2.0, 3.0])
    assert len(list(store.glob("*.pb"))) == 1
    _WEIGHTS["variable"] = None                # tracing again would fail: nothing to read
    again = programs.stored_program(tf.function(_scaled), freeze=True, salt="weights A")
    np.testing.assert_allclose(again(np.full(2, 2.0, np.float32)).numpy(), [4.0, 6.0])
    _WEIGHTS["variable"] = tf.Variable([5.0, 7.0])
    other = programs.stored_program(tf.function(_scaled), freeze=True, salt="weights B")
    np.testing.assert_allclose(other(np.ones(2, np.float32)).numpy(), [5.0, 7.0])
    assert len(list(store.glob("*.pb"))) == 2


_SEGMENTER_FIELD = """
import sys
import numpy as np
import ltnet_keras
from ltnet_keras._compat import start_tensorflow_quietly
start_tensorflow_quietly()
from ltnet_keras.inference.segment import Segmenter
segmenter = Segmenter(sys.argv[1], align="none")
field = np.asarray(segmenter.forward_field(segmenter.prepare(sys.argv[2])))
print(int("voxelmorph" in sys.modules), float(np.abs(field).sum()))
"""


def test_a_later_process_gets_g_f_s_field_without_building_g_f(tmp_path, lpba40_root):
    from pathlib import Path
    run = Path(__file__).resolve().parents[2] / "results" / "recipe" / "ltnet"
    env = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    env.update(LTNET_XLA_CACHE=str(tmp_path / "xla"), TF_CPP_MIN_LOG_LEVEL="3")
    printed = [subprocess.run([sys.executable, "-c", _SEGMENTER_FIELD, str(run),
                               str(lpba40_root / "images" / "S31.nii.gz")], env=env,
                              capture_output=True, text=True, check=True).stdout.split()
               for _ in range(2)]
    assert printed[0][0] == "1" and printed[1][0] == "0"   # voxelmorph built G_F the first time
    assert printed[1][1] == printed[0][1] and float(printed[0][1]) > 0
