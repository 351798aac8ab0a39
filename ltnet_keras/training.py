"""Running a training: strategy, checkpoints, resume, logs, NaN guard, loss curve.

A run directory holds ``config.yaml``, ``environment.json`` (versions, devices, seed),
``atlas.json`` (atlas, label table, grid), ``checkpoints/``, ``logs/`` (TensorBoard),
``history.csv`` (one row per ``log_every`` steps), ``loss_curve.png``, with
``data.align: affine`` ``aligned/`` (the pool and validation scans aligned to the atlas, and the
alignments) and, at the end, ``forward_generator.h5`` (all that segmentation needs) and, for
objectives with a backward path, ``backward_generator.h5`` (G_B: the reconstructed atlas of
Fig. 3).
"""
import contextlib
import csv
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tensorflow as tf

from ltnet_keras.config import (BACKWARD_WEIGHTS, FORWARD_WEIGHTS,  # noqa: F401  (run files)
                                ExperimentConfig, check_resume_config, config_to_dict,
                                save_config)
from ltnet_keras.data.dataset import TrainingData, load_training_data, training_dataset
# make_strategy and split_cpu are imported from here by callers that train on one machine.
from ltnet_keras.distribute import (PEER_FAILURES, WorkerLostError, WorkerRole,  # noqa: F401
                                    fresh_dir, make_strategy, split_cpu, strategy_name,
                                    worker_batches, worker_lost_message, worker_role)
from ltnet_keras.models.ltnet import LTNet
from ltnet_keras.records import atomic_write_text, package_versions, shown_path

#: Wall time of training, summed over every sitting of a run (resumes included).
TRAIN_CLOCK = "train_seconds.json"
# With data.align: affine, the scans aligned to the atlas (and their alignments) are kept here.
ALIGNED_DIR = "aligned"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the last good checkpoint is kept."""


def environment_record(config: ExperimentConfig, strategy) -> dict:
    return {"packages": package_versions(), "platform": platform.platform(),
            "seed": config.train.seed, "devices": list(strategy.extended.worker_devices),
            "strategy": strategy_name(strategy), "workers": worker_role(strategy).workers,
            "replicas": strategy.num_replicas_in_sync,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}


def _write_json(path: Path, values: dict) -> None:
    atomic_write_text(path, json.dumps(values, indent=2))


class EveryNthStep(tf.keras.optimizers.schedules.LearningRateSchedule):
    """``learning_rate`` on steps 0, n, 2n, ... of its optimiser and 0 in between.

    Updates D once every ``n`` generator steps (``train.discriminator_every``). D's Adam moments
    still see every step's gradient; only the parameter update is skipped.
    """

    def __init__(self, learning_rate: float, every: int):
        self.learning_rate = float(learning_rate)
        self.every = int(every)

    def __call__(self, step):
        on_step = tf.equal(tf.math.floormod(step, self.every), 0)
        return tf.where(on_step, self.learning_rate, 0.0)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "every": self.every}


def build_model(config: ExperimentConfig, inshape, fast_path: bool = True) -> LTNet:
    """LT-Net with its two Adam optimisers (constant learning rate, Sec. 5).

    ``fast_path=False`` builds the straightforward reference (see :class:`LTNet`)."""
    model = LTNet(inshape, config.network, config.weights, config.penalties, config.train,
                  fast_path=fast_path)
    train = config.train
    discriminator_optimizer = None
    if model.discriminator is not None:
        lr = train.discriminator_learning_rate or train.learning_rate
        if train.discriminator_every > 1:
            lr = EveryNthStep(lr, train.discriminator_every)
        discriminator_optimizer = tf.keras.optimizers.Adam(lr)
    model.compile(tf.keras.optimizers.Adam(train.learning_rate), discriminator_optimizer,
                  jit_compile=train.jit_compile)
    model.build_optimizers()
    return model


def _save_weights(network, path: Path) -> None:
    """``network``'s weights at ``path``, written whole or not at all."""
    tmp = path.with_name(path.stem + ".tmp.h5")
    network.save_weights(str(tmp))
    os.replace(tmp, path)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def init_source_weights(config: ExperimentConfig, atlas: str) -> Path:
    """The ``forward_generator.h5`` of the finished run ``train.init_from``, checked.

    The source run must share the atlas, the network grid and the U-Net: otherwise its field
    would mean something else here.
    """
    import yaml
    source = Path(config.train.init_from)
    weights = source / FORWARD_WEIGHTS
    for needed in (source / "config.yaml", source / "atlas.json", weights):
        if not needed.exists():
            raise FileNotFoundError(f"train.init_from: {needed} is missing (not a finished run)")
    source_config = yaml.safe_load((source / "config.yaml").read_text())
    source_atlas = json.loads((source / "atlas.json").read_text())["atlas"]
    mismatches = []
    if source_atlas != atlas:
        mismatches.append(f"atlas {source_atlas} != {atlas}")
    ours = config_to_dict(config)
    for section, keys in (("data", ("crop_shape", "factor")),
                          ("network", ("enc_features", "dec_features", "int_steps"))):
        for key in keys:
            # YAML gives lists where the dataclass may hold tuples.
            theirs_value = _plain(source_config[section][key])
            ours_value = _plain(ours[section][key])
            if theirs_value != ours_value:
                mismatches.append(f"{section}.{key} {theirs_value} != {ours_value}")
    if mismatches:
        raise ValueError(f"train.init_from {source} does not match this run: "
                         + "; ".join(mismatches))
    return weights


def gradient_norm_probe(model: LTNet, data: TrainingData):
    """``model.field_gradient_norms`` on a fixed pair (the atlas and the first pool scan), as
    a function returning plain floats; fixed so that the curves show training, not pairs."""
    atlas = tf.constant(data.atlas.image[None, ..., None])
    atlas_labels = tf.constant(data.atlas_one_hot[None])
    target = tf.constant(data.targets[0].image[None, ..., None])
    norms = tf.function(model.field_gradient_norms)

    def probe():
        return {name: float(value) for name, value in norms(atlas, atlas_labels, target).items()}
    return probe


class RunMonitor(tf.keras.callbacks.Callback):
    """Stops on a non-finite loss before it can be checkpointed; logs and checkpoints blocks."""

    def __init__(self, manager: tf.train.CheckpointManager, history_path: Optional[Path],
                 log_every: int, checkpoint_every: int, total_steps: int, diagnose=None):
        super().__init__()
        # Called at each log step; its floats join the logged values (history, TensorBoard).
        self.diagnose = diagnose
        self.manager = manager
        # None on a worker that is not the chief: only the chief keeps the history.
        self.history_path = history_path
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.total_steps = total_steps
        self.failure: Optional[str] = None
        self.last_good_step: Optional[int] = None

    def _step(self) -> int:
        return int(self.model.generator_optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        bad = {k: float(v) for k, v in (logs or {}).items() if not math.isfinite(float(v))}
        if bad:
            self.failure = (f"non-finite loss at step {self._step()}: {bad}; the run stopped and "
                            f"its last good checkpoint is {self.manager.latest_checkpoint}")
            self.model.stop_training = True
        else:
            self.last_good_step = self._step()

    def on_epoch_end(self, epoch, logs=None):
        if self.failure:
            return
        step = self._step()
        if logs is not None and self.diagnose is not None:
            # The same dict reaches the TensorBoard callback after this one.
            logs.update(self.diagnose())
        row = {"step": step, **{k: float(v) for k, v in (logs or {}).items()}}
        if self.history_path is not None:
            new_file = not self.history_path.exists()
            with open(self.history_path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
        if step % self.checkpoint_every == 0 or step >= self.total_steps:
            self.manager.save(checkpoint_number=step)


def read_history(path) -> list:
    """The rows of a run's ``history.csv`` as dicts of strings ([] if there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _truncate_history(path: Path, step: int) -> None:
    """Drop history rows past the checkpoint we resume from (they will be recomputed)."""
    rows = read_history(path)
    if not rows:
        return
    kept = [r for r in rows if int(float(r["step"])) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)


def plot_history(history_path: Path, out_path: Path) -> None:
    # A bare Figure (no pyplot) leaves the caller's matplotlib backend alone, e.g. in notebooks.
    from matplotlib.figure import Figure
    rows = read_history(history_path)
    if not rows:
        return
    steps = [float(r["step"]) for r in rows]
    gradient_names = [k for k in rows[0] if k.startswith("grad_")]
    term_names = [k for k in rows[0] if k not in ["step", "total", "field_magnitude"]
                  + gradient_names]
    panels = [("total generator loss", ["total"]), ("terms (unweighted)", term_names),
              ("field magnitude (voxels)", ["field_magnitude"] if "field_magnitude" in rows[0]
               else [])]
    if gradient_names:
        panels.append(("|d term / d forward field| (weighted)", gradient_names))
    panels = [(title, names) for title, names in panels if names]
    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels))
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            ax.plot(steps, [float(r[name]) for r in rows], label=name)
        if title.startswith("|d term"):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, out_path)


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    resumed_from: int
    model: LTNet
    data: TrainingData


def train_seconds(run_dir) -> Optional[float]:
    """Wall time (s) the run in ``run_dir`` has spent training, over all its sittings; ``None``
    for a run that never recorded it (trained before the clock existed)."""
    path = Path(run_dir) / TRAIN_CLOCK
    if not path.exists():
        return None
    return float(json.loads(path.read_text())["seconds"])


def _add_train_seconds(run_dir: Path, seconds: float) -> None:
    total = (train_seconds(run_dir) or 0.0) + seconds
    atomic_write_text(run_dir / TRAIN_CLOCK, json.dumps({"seconds": total}))


def train(config: ExperimentConfig, run_dir, strategy=None, verbose: int = 1,
          data: Optional[TrainingData] = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir``; returns the model and the data it used.

    The configuration and every training file are checked before ``run_dir`` is created, so
    a refused run leaves no run directory behind. With a multi-worker ``strategy`` only the
    chief writes ``run_dir``; the other workers write into ``run_dir/workertemp_<task id>``
    and delete it when they stop (see :mod:`ltnet_keras.distribute`).
    """
    run_dir = Path(run_dir)
    check_resume_config(run_dir, config)
    steps, log_every = config.train.steps, config.train.log_every
    if steps % log_every or config.train.checkpoint_every % log_every:
        raise ValueError(f"train.steps ({steps}) and train.checkpoint_every "
                         f"({config.train.checkpoint_every}) must be multiples of "
                         f"train.log_every ({log_every})")
    tf.keras.utils.set_random_seed(config.train.seed)
    strategy = strategy or make_strategy(config.train.devices)
    role = worker_role(strategy)
    run_dir_existed = run_dir.exists()
    try:
        return _train(config, run_dir, strategy, role, verbose, data)
    except PEER_FAILURES as error:
        if not role.multi_worker:
            raise
        # A peer failed outside the steps (start-up, the first exchange of weights).
        last = _checkpoint_number(tf.train.latest_checkpoint(str(run_dir / "checkpoints")))
        raise WorkerLostError(worker_lost_message(error, role, last)) from None
    finally:
        if not role.is_chief:
            shutil.rmtree(role.write_dir(run_dir), ignore_errors=True)
            if not run_dir_existed:
                # Left empty when the run stopped before the chief wrote anything.
                with contextlib.suppress(OSError):
                    run_dir.rmdir()


def _checkpoint_number(path: Optional[str]) -> Optional[int]:
    return None if path is None else int(path.rsplit("-", 1)[1])


def _train(config: ExperimentConfig, run_dir: Path, strategy, role: WorkerRole, verbose: int,
           data: Optional[TrainingData]) -> TrainResult:
    steps, log_every = config.train.steps, config.train.log_every
    write_dir = role.write_dir(run_dir)
    if not role.is_chief:
        fresh_dir(write_dir)  # a worker killed earlier leaves its scratch behind
    atlas_record = run_dir / "atlas.json"
    saved_atlas = json.loads(atlas_record.read_text())["atlas"] if atlas_record.exists() else None
    data = data or load_training_data(config.data, atlas=saved_atlas,
                                      cache_dir=write_dir / ALIGNED_DIR)
    # A resumed run restores G_F from its checkpoint; a new one may start from another run's.
    # Every worker reads either: a restore on the chief alone put the workers' collectives
    # out of step (seen in tests/test_multi_worker.py), so all of them restore alike.
    init_weights = (init_source_weights(config, data.atlas.subject) if config.train.init_from
                    and not tf.train.latest_checkpoint(str(run_dir / "checkpoints")) else None)
    with strategy.scope():
        model = build_model(config, data.atlas.image.shape)
    if init_weights is not None:
        model.forward_generator.load_weights(str(init_weights))

    if role.is_chief:
        _write_run_records(config, run_dir, strategy, data)

    tracked = {"model": model, "generator_optimizer": model.generator_optimizer}
    if model.discriminator_optimizer is not None:
        tracked["discriminator_optimizer"] = model.discriminator_optimizer
    checkpoint = tf.train.Checkpoint(**tracked)
    # CheckpointManager writes the data files first and swaps the small index file atomically,
    # so a run killed mid-save resumes from the previous complete checkpoint. Saving is a
    # collective: the other workers save too, into their temporary directory.
    manager = tf.train.CheckpointManager(checkpoint, write_dir / "checkpoints", max_to_keep=2)
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))  # the chief's
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    start = int(model.generator_optimizer.iterations.numpy())
    history = run_dir / "history.csv" if role.is_chief else None
    if history is not None:
        _truncate_history(history, start)

    if start < steps:
        replicas = strategy.num_replicas_in_sync

        def global_batches():
            return training_dataset(data, replicas, config.train.seed, start, steps)
        dataset = (worker_batches(strategy, global_batches) if role.multi_worker
                   else global_batches())
        probe = gradient_norm_probe(model, data) if config.train.log_grad_norms else None
        monitor = RunMonitor(manager, history, log_every, config.train.checkpoint_every, steps,
                             probe)
        callbacks = [monitor, tf.keras.callbacks.TensorBoard(str(write_dir / "logs"))]
        clock = time.perf_counter()
        try:
            model.fit(dataset, epochs=steps // log_every, steps_per_epoch=log_every,
                      initial_epoch=start // log_every, callbacks=callbacks, verbose=verbose)
        except tf.errors.InvalidArgumentError as error:
            # A NaN displacement becomes the gather index INT_MIN inside the warp.
            if "-2147483648" not in str(error):
                raise
            # The optimiser counter may already be past the failed step (its increment does
            # not wait for the warp), so count from the last step the monitor saw finish.
            step = (start if monitor.last_good_step is None else monitor.last_good_step) + 1
            raise NonFiniteLossError(
                f"non-finite displacement field at step {step} (NaN in the input or the "
                f"network); the run stopped and its last good checkpoint is "
                f"{manager.latest_checkpoint}") from None
        except PEER_FAILURES as error:
            if not role.multi_worker:
                raise
            # This sitting's last checkpoint, else the one it resumed from.
            last = _checkpoint_number(manager.latest_checkpoint) or start or None
            raise WorkerLostError(worker_lost_message(error, role, last)) from None
        finally:
            # Counted even for a sitting that fails or is interrupted: its steps after the
            # last checkpoint are redone on resume, and that time was spent too.
            if role.is_chief:
                _add_train_seconds(run_dir, time.perf_counter() - clock)
        if monitor.failure:
            raise NonFiniteLossError(monitor.failure)
    if role.is_chief:
        _save_weights(model.forward_generator, run_dir / FORWARD_WEIGHTS)
        if model.backward_generator is not None:
            _save_weights(model.backward_generator, run_dir / BACKWARD_WEIGHTS)
        plot_history(history, run_dir / "loss_curve.png")
    return TrainResult(run_dir, int(model.generator_optimizer.iterations.numpy()), start,
                       model, data)


def _write_run_records(config: ExperimentConfig, run_dir: Path, strategy,
                       data: TrainingData) -> None:
    """``config.yaml``, ``environment.json`` and ``atlas.json`` (the chief's job)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    _write_json(run_dir / "environment.json", environment_record(config, strategy))
    root = config.data.resolved_root()
    _write_json(run_dir / "atlas.json", {
        "atlas": data.atlas.subject,
        # Relative to data.root (where under it), so no machine's path is pinned in the record.
        "image": shown_path(data.atlas.image_path, root),
        "labels": shown_path(data.atlas.label_path, root),
        "labels_tsv": shown_path(config.data.resolved_labels_tsv(), root),
        "label_ids": [int(i) for i in data.table.ids], "grid": data.atlas.grid.to_dict(),
        "targets": [t.subject for t in data.targets],
        "extra_atlases": [a.subject for a in data.extra_atlases]})
