"""LTNet.train_step: every term of Eq. (11), G and D updates, the weighted total, and
MirroredStrategy equivalence (2 replicas of 1 example == 1 device with the batch of 2)."""
import json
import os
import subprocess
import sys
import textwrap

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.config import ExperimentConfig, apply_preset
from ltnet_keras.training import build_model

EQ11_TERMS = ("gan", "sim", "cyc", "smooth", "trans", "anatomy_cyc", "diff_cyc")


def random_batch(shape, batch=1, channels=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, channels, (1,) + shape)
    return {"atlas": tf.constant(np.repeat(rng.random((1,) + shape + (1,), dtype=np.float32),
                                           batch, 0)),
            "atlas_labels": tf.constant(np.repeat(np.eye(channels, dtype=np.float32)[labels],
                                                  batch, 0)),
            "target": tf.constant(rng.random((batch,) + shape + (1,), dtype=np.float32))}


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


@pytest.fixture(scope="module")
def ltnet_step():
    """One eager ltnet train_step at 32^3 on random data with 5 one-hot label channels."""
    config = apply_preset(ExperimentConfig(), "ltnet")
    tf.keras.utils.set_random_seed(0)
    model = build_model(config, (32, 32, 32))
    g_vars = model.generator_variables
    d_vars = model.discriminator.trainable_variables
    before_g, before_d = snapshot(g_vars), snapshot(d_vars)
    logs = {k: float(v) for k, v in model.train_step(random_batch((32, 32, 32))).items()}
    return dict(config=config, model=model, logs=logs, before_g=before_g, before_d=before_d)


def test_ltnet_step_returns_every_term_finite(ltnet_step):
    logs = ltnet_step["logs"]
    assert set(logs) == set(EQ11_TERMS) | {"total", "discriminator", "field_magnitude"}
    bad = {k: v for k, v in logs.items() if not np.isfinite(v)}
    assert not bad, bad
    # a few sanity bounds: -NCC in (-1, 0], Dice loss in [0, 1], LSGAN losses >= 0
    assert -1.0 < logs["sim"] <= 0.0
    assert 0.0 <= logs["anatomy_cyc"] <= 1.0
    assert logs["gan"] >= 0.0 and logs["discriminator"] >= 0.0
    assert logs["cyc"] >= 0.0 and logs["smooth"] >= 0.0


def test_ltnet_step_updates_g_and_d(ltnet_step):
    model = ltnet_step["model"]
    g_vars, d_vars = model.generator_variables, model.discriminator.trainable_variables
    n_forward = len(model.forward_generator.trainable_variables)
    assert changed(ltnet_step["before_g"][:n_forward], g_vars[:n_forward]) > 0, "G_F unchanged"
    assert changed(ltnet_step["before_g"][n_forward:], g_vars[n_forward:]) > 0, "G_B unchanged"
    assert changed(ltnet_step["before_d"], d_vars) > 0, "D was not updated"
    assert int(model.generator_optimizer.iterations.numpy()) == 1
    assert int(model.discriminator_optimizer.iterations.numpy()) == 1


def test_ltnet_total_is_the_eq11_weighted_sum(ltnet_step):
    logs, weights = ltnet_step["logs"], ltnet_step["config"].weights.terms()
    expected = sum(weights[name] * logs[name] for name in EQ11_TERMS)
    assert logs["total"] == pytest.approx(expected, abs=1e-4, rel=1e-4), (logs, weights)


def test_voxelmorph_step_has_no_discriminator():
    config = apply_preset(ExperimentConfig(), "voxelmorph")
    tf.keras.utils.set_random_seed(0)
    model = build_model(config, (16, 16, 16))
    assert model.discriminator is None and model.discriminator_optimizer is None
    assert model.backward_generator is None
    before = snapshot(model.generator_variables)
    logs = {k: float(v) for k, v in model.train_step(random_batch((16, 16, 16), batch=2)).items()}
    assert set(logs) == {"sim", "smooth", "total", "field_magnitude"}
    assert all(np.isfinite(v) for v in logs.values())
    assert logs["total"] == pytest.approx(logs["sim"] + 1.0 * logs["smooth"], abs=1e-5)
    assert changed(before, model.generator_variables) > 0


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import ltnet_keras  # noqa
    from ltnet_keras.training import split_cpu
    split_cpu(2)  # before TensorFlow initialises its devices
    import numpy as np
    import tensorflow as tf
    from ltnet_keras.config import ExperimentConfig, apply_preset
    from ltnet_keras.training import build_model, make_strategy

    shape = (16, 16, 16)
    config = apply_preset(ExperimentConfig(), "ltnet")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (1,) + shape)
    batch = {"atlas": np.repeat(rng.random((1,) + shape + (1,), dtype=np.float32), 2, 0),
             "atlas_labels": np.repeat(np.eye(5, dtype=np.float32)[labels], 2, 0),
             "target": rng.random((2,) + shape + (1,), dtype=np.float32)}

    def one_step(devices):
        strategy = make_strategy(devices)
        tf.keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config, shape)
            # SGD: unlike Adam's first step (~lr * sign(g)), its update scales with the
            # gradient, so a wrong replica reduction would show.
            model.compile(tf.keras.optimizers.SGD(0.5), tf.keras.optimizers.SGD(0.5))
        g = model.forward_generator.trainable_variables
        d = model.discriminator.trainable_variables
        g0, d0 = [v.numpy() for v in g], [v.numpy() for v in d]
        data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))
        strategy.run(model.train_step, args=(next(iter(data)),))
        logs = {k: float(t.result()) for k, t in model.trackers.items()}
        return dict(replicas=strategy.num_replicas_in_sync, g0=g0, d0=d0,
                    g1=[v.numpy() for v in g], d1=[v.numpy() for v in d], logs=logs)

    one, two = one_step(1), one_step(2)
    flat = lambda arrays: np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    def rel(a, b):
        return float(np.linalg.norm(flat(a) - flat(b)) / max(np.linalg.norm(flat(a)), 1e-30))
    delta = lambda r, k: [a - b for a, b in zip(r[k + "1"], r[k + "0"])]
    print("RESULT " + json.dumps({
        "replicas": [one["replicas"], two["replicas"]],
        "devices": [d.name for d in tf.config.list_logical_devices("CPU")],
        "init_equal": rel(one["g0"], two["g0"]) == 0 and rel(one["d0"], two["d0"]) == 0,
        "g_delta_norm": float(np.linalg.norm(flat(delta(one, "g")))),
        "g_delta_rel": rel(delta(one, "g"), delta(two, "g")),
        "d_delta_rel": rel(delta(one, "d"), delta(two, "d")),
        "g_weights_rel": rel(one["g1"], two["g1"]),
        "logs": [one["logs"], two["logs"]]}))
""")


@pytest.mark.slow
def test_two_replica_step_equals_one_device_step():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == [1, 2], result
    assert len(result["devices"]) == 2
    assert result["init_equal"], "the seeded models started from different weights"
    assert result["g_delta_norm"] > 0
    # the updates (not just the weights, which barely move) agree
    assert result["g_delta_rel"] < 1e-4, result
    assert result["d_delta_rel"] < 1e-4, result
    assert result["g_weights_rel"] < 1e-4, result
    one, two = result["logs"]
    assert set(one) == set(EQ11_TERMS) | {"total", "discriminator", "field_magnitude"}
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), (name, one, two)


@pytest.mark.parametrize("ramp_steps, step, expected_scale", [
    (0, 0, 1.0),      # the paper: full Eq. (11) weights from the first step
    (100, 0, 0.0),    # ramp: starts as VoxelMorph (only sim and smooth)
    (100, 25, 0.25),
    (100, 100, 1.0),
    (100, 400, 1.0),
])
def test_ramp_scales_only_the_non_voxelmorph_terms(ramp_steps, step, expected_scale):
    import dataclasses
    config = apply_preset(ExperimentConfig(), "ltnet")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                   ramp_steps=ramp_steps))
    model = build_model(config, (32, 32, 32))
    model.generator_optimizer.iterations.assign(step)
    weights = {k: float(v) for k, v in model.current_weights().items()}
    full = config.weights.terms()
    for name in EQ11_TERMS:
        scale = 1.0 if name in ("sim", "smooth") else expected_scale
        assert weights[name] == pytest.approx(full[name] * scale), name
