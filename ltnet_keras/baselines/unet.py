"""The U-Net and training loop shared by the segmentation baselines (Table 5's supervised U-Net
and DataAug's segmenter): voxelmorph 0.2's U-Net, soft Dice + cross-entropy, the per-step
random draws, and a resumable Adam loop with checkpoints and a history CSV.

Both :mod:`ltnet_keras.baselines.segnet` and :mod:`ltnet_keras.baselines.dataaug` build on this
module; neither imports the other's internals through it.
"""
import csv
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from ltnet_keras.records import file_digest, package_versions  # noqa: F401  (callers' name)

# ----------------------------------------------------------------------------- network

def build_unet(inshape, in_channels: int, enc_features, dec_features, name: str):
    """voxelmorph 0.2's U-Net on ``inshape + (in_channels,)``: its last decoder features."""
    import voxelmorph as vxm
    return vxm.networks.Unet(inshape=tuple(int(s) for s in inshape) + (int(in_channels),),
                             nb_features=[list(enc_features), list(dec_features)],
                             name=f"{name}_unet")

# ----------------------------------------------------------------------------- loss

def soft_dice_loss(y_true, y_pred, smooth: float = 1.0):
    """``1 - mean_c (2 sum_v y p + s) / (sum_v y + sum_v p + s)`` per example.

    The soft Dice of V-Net (Milletari et al., 3DV 2016) with plain (not squared) sums, averaged
    over every channel including background; ``s`` (in voxels) keeps a channel absent from
    both maps at Dice 1. ``y_true``, ``y_pred``: ``(batch, x, y, z, C)``; returns ``(batch,)``.
    """
    import tensorflow as tf
    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    axes = [1, 2, 3]
    overlap = tf.reduce_sum(y_true * y_pred, axes)
    sizes = tf.reduce_sum(y_true, axes) + tf.reduce_sum(y_pred, axes)
    dice = (2.0 * overlap + smooth) / (sizes + smooth)
    return 1.0 - tf.reduce_mean(dice, -1)


def cross_entropy_loss(y_true, y_pred, eps: float = 1e-7):
    """Mean over voxels of ``-sum_c y log p`` (``p`` clipped to ``[eps, 1]``); ``(batch,)``."""
    import tensorflow as tf
    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), eps, 1.0)
    return tf.reduce_mean(-tf.reduce_sum(y_true * tf.math.log(y_pred), -1), [1, 2, 3])


def segmentation_loss_terms(y_true, y_pred, dice_weight: float = 1.0,
                            cross_entropy_weight: float = 1.0) -> Dict[str, object]:
    """``{"dice", "cross_entropy", "total"}``, each ``(batch,)``; total is the weighted sum."""
    dice = soft_dice_loss(y_true, y_pred)
    cross_entropy = cross_entropy_loss(y_true, y_pred)
    return {"total": dice_weight * dice + cross_entropy_weight * cross_entropy,
            "dice": dice, "cross_entropy": cross_entropy}


# ----------------------------------------------------------------------------- training data

def draw_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random draws of one step: a pure function of (seed, stream, step), so a resumed run
    sees exactly the volumes the uninterrupted run would have seen (``stream`` keeps the draws
    of different trainings of one run apart)."""
    return np.random.default_rng([int(seed), int(stream), int(step)])


# ----------------------------------------------------------------------------- training loop

@dataclass
class LoopResult:
    steps_done: int
    resumed_from: int
    seconds_per_step: float = float("nan")


def _append_history(path: Path, row: dict) -> None:
    new_file = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def train_loop(model, optimizer, loss_fn: Callable, next_batch: Callable[[int], tuple],
               run_dir, steps: int, log_every: int, checkpoint_every: int,
               weights_name: str, verbose: int = 1, label: str = "") -> LoopResult:
    """Adam steps ``[start, steps)`` of ``model`` with checkpoints and resume.

    ``loss_fn(model, *batch)`` returns per-example ``(batch,)`` terms including ``"total"``
    (the minimised mean); ``next_batch(step)`` gives the numpy batch of a step (a pure function
    of the step, so a resumed run continues the same sequence). Every ``log_every`` steps the
    block's mean of each term is appended to ``run_dir/history.csv``; checkpoints (model and
    optimiser, the step count is the optimiser's) go to ``run_dir/checkpoints/`` every
    ``checkpoint_every`` steps and at the end, and the final weights to
    ``run_dir/weights_name``. A non-finite loss stops the run before it is checkpointed
    (:class:`ltnet_keras.training.NonFiniteLossError`).
    """
    import tensorflow as tf

    from ltnet_keras.training import NonFiniteLossError, _truncate_history, plot_history
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(checkpoint, run_dir / "checkpoints", max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start = int(optimizer.iterations.numpy())
    history = run_dir / "history.csv"
    weights = run_dir / weights_name
    _truncate_history(history, start)
    if start >= steps and weights.exists():
        return LoopResult(start, start)

    @tf.function(reduce_retracing=True)
    def train_step(*batch):
        with tf.GradientTape() as tape:
            terms = loss_fn(model, *batch)
            total = tf.reduce_mean(terms["total"])
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return {name: tf.reduce_mean(value) for name, value in terms.items()}

    sums: Dict[str, float] = {}
    clock = time.perf_counter()
    for step in range(start, steps):
        values = {k: float(v) for k, v in train_step(*next_batch(step)).items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(f"{label or run_dir}: non-finite loss at step {step + 1}: "
                                     f"{bad}; the last good checkpoint is "
                                     f"{manager.latest_checkpoint}")
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        done = step + 1
        if done % log_every == 0:
            row = {"step": done, **{k: v / log_every for k, v in sums.items()}}
            _append_history(history, row)
            sums = {}
            if verbose:
                terms = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
                print(f"[{label or run_dir.name}] step {done}/{steps}: {terms}", flush=True)
        if done % checkpoint_every == 0 or done == steps:
            manager.save(checkpoint_number=done)
    seconds = (time.perf_counter() - clock) / max(steps - start, 1)
    tmp = run_dir / f"{Path(weights_name).stem}.tmp.h5"
    model.save_weights(str(tmp))
    os.replace(tmp, weights)
    plot_history(history, run_dir / "loss_curve.png")
    return LoopResult(int(optimizer.iterations.numpy()), start, seconds)


# ----------------------------------------------------------------------------- a run

def environment_record(seed: int) -> dict:
    return {"packages": package_versions(), "platform": platform.platform(), "seed": seed,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
