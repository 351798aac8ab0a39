"""Training on several machines: MultiWorkerMirroredStrategy against MirroredStrategy, a
killed worker, resume, and the strategy choice (TF_CONFIG, SLURM).

The cluster tests start real processes on this machine (localhost ports, CPU, one thread
each), on a synthetic 3-subject data set at 32^3 (network grid 16^3), voxelmorph, 4 steps.
One scenario serves them all, to pay TensorFlow's start-up as few times as possible:

1. ``ltnet train`` (the README's command) as worker 0 and worker 1 of a TF_CONFIG cluster
   (``train.steps`` 200, checkpoints every 2 steps) and, at the same time, one process running
   MirroredStrategy over two logical CPUs (same global batch: 2 pairs) for 4 steps;
2. worker 1 is killed (SIGKILL) once the chief has written the step-2 checkpoint: the chief
   must stop within ``STOP_TIMEOUT`` with a message naming worker 1 and the step to resume;
3. both workers are started again with ``--steps 4``: they resume from step 2 and finish.

The two-worker run (steps 1-2 in the first sitting, 3-4 in the resumed one) must give the
one-process run's loss history and final weights to ``ATOL`` (measured here: identical).
"""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)

import h5py
import numpy as np
import pytest
import tensorflow as tf

from ltnet_keras.config import config_from_dict, save_config
from ltnet_keras.data.synthetic import write_synthetic_dataset
from ltnet_keras.distribute import (WorkerRole, choose_strategy, cluster_resolver,
                                    read_tf_config, worker_lost_message, worker_role)

#: Agreement of the two-worker run with the one-process run: weights and every logged loss.
ATOL = 1e-5
#: The chief must end the run this long after a worker is killed (it takes ~2 s here).
STOP_TIMEOUT = 120
#: One sitting of a few steps (TensorFlow's start-up dominates: 10-60 s on a busy machine).
SITTING_TIMEOUT = 600
REPO = Path(__file__).resolve().parents[1]


def write_config(root, path, steps):
    save_config(config_from_dict({
        "name": "two_workers", "preset": "voxelmorph",
        "data": {"root": str(root), "atlas": "SYN01",
                 "train_subjects": ["SYN01", "SYN02", "SYN03"], "val_subjects": ["SYN03"],
                 "crop_shape": [32, 32, 32], "factor": 2},
        # Two pool scans, so the two replicas' pairs differ.
        "train": {"steps": steps, "log_every": 1, "checkpoint_every": 2, "seed": 0}}), path)
    return path


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def environment(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


class Processes:
    """The processes a test starts, each logging to its own files; none outlives the test."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started = []

    def start(self, name, argv, env):
        out = open(self.log_dir / f"{name}.out", "w")
        err = open(self.log_dir / f"{name}.err", "w")
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        process.name, process.files = name, (out, err)
        self.started.append(process)
        return process

    def wait(self, process, timeout):
        try:
            process.wait(timeout=timeout)
        finally:
            for handle in process.files:
                handle.close()
        return (self.log_dir / f"{process.name}.out").read_text(), \
            (self.log_dir / f"{process.name}.err").read_text()

    def kill_all(self):
        alive = [p.name for p in self.started if p.poll() is None]
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()
        return alive


def ltnet_train(config, run, *options):
    return [sys.executable, "-m", "ltnet_keras.cli", "train", "--config", str(config),
            "--out", str(run), *options]


def start_workers(processes, sitting, ports, config, run, *options):
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    return [processes.start(f"{sitting}_worker{index}", ltnet_train(config, run, *options),
                            environment(TF_CONFIG=json.dumps({
                                "cluster": cluster, "task": {"type": "worker",
                                                             "index": index}})))
            for index in range(len(ports))]


# One process, MirroredStrategy over the CPU split in two logical devices: what `ltnet train`
# does on a machine with two GPUs.
_MIRRORED_OVER_TWO_CPUS = (
    "import sys, ltnet_keras\n"
    "from ltnet_keras.distribute import split_cpu\n"
    "split_cpu(2)\n"
    "from ltnet_keras.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def checkpoint_step(run):
    latest = tf.train.latest_checkpoint(str(Path(run) / "checkpoints"))
    return None if latest is None else int(latest.rsplit("-", 1)[1])


def history(run):
    with open(Path(run) / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                          if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """The scenario of the module docstring; returns what each test checks."""
    base = tmp_path_factory.mktemp("multi_worker")
    root = write_synthetic_dataset(base / "data", n_subjects=3, shape=(32, 32, 32))
    long_config = write_config(root, base / "long.yaml", steps=200)
    config = write_config(root, base / "config.yaml", steps=4)
    run, reference = base / "two_workers", base / "mirrored"
    processes = Processes(base)
    found = {"run": run, "reference": reference, "base": base}
    try:
        mirrored = processes.start("mirrored", [sys.executable, "-c", _MIRRORED_OVER_TWO_CPUS,
                                                *ltnet_train(config, reference)[3:],
                                                "--strategy", "mirrored"], environment())
        ports = free_ports(2)
        chief, worker1 = start_workers(processes, "first", ports, long_config, run)
        deadline = time.time() + SITTING_TIMEOUT
        # Saving is a collective: worker 1 saves its copy into its scratch directory.
        scratch_checkpoint = run / "workertemp_1" / "checkpoints" / "ckpt-2.index"
        while (checkpoint_step(run) or 0) < 2 or not scratch_checkpoint.exists():
            if time.time() > deadline or chief.poll() is not None or worker1.poll() is not None:
                processes.kill_all()
                pytest.fail(f"no step-2 checkpoint in {run} (chief: {checkpoint_step(run)}) "
                            f"or in worker 1's scratch ({scratch_checkpoint.exists()}): "
                            + (base / "first_worker0.err").read_text()[-3000:]
                            + (base / "first_worker1.err").read_text()[-3000:])
            time.sleep(0.02)
        found["scratch_while_training"] = sorted(
            p.relative_to(run).as_posix() for p in (run / "workertemp_1").rglob("*.index"))
        worker1.send_signal(signal.SIGKILL)
        killed_at = time.time()
        processes.wait(worker1, 60)
        try:
            chief_err = processes.wait(chief, STOP_TIMEOUT)[1]
            found["chief_stopped_after"] = time.time() - killed_at
        except subprocess.TimeoutExpired:
            found["chief_stopped_after"] = None
            processes.kill_all()
            chief_err = (base / "first_worker0.err").read_text()
        found.update(ports=ports, chief_code=chief.returncode, chief_err=chief_err,
                     killed_code=worker1.returncode, checkpoint_after_kill=checkpoint_step(run))

        resumed = start_workers(processes, "resumed", free_ports(2), long_config, run,
                                "--steps", "4")
        found["resumed"] = [(p.wait(SITTING_TIMEOUT), *processes.wait(p, 0)) for p in resumed]
        found["mirrored"] = (mirrored.wait(SITTING_TIMEOUT), *processes.wait(mirrored, 0))
    finally:
        found["left_running"] = processes.kill_all()
    return found


@pytest.mark.slow
def test_killed_worker_ends_the_run_with_a_message(cluster_runs):
    runs = cluster_runs
    assert not runs["left_running"], runs["left_running"]
    assert runs["killed_code"] == -signal.SIGKILL
    # While it trained, worker 1 saved its share of each checkpoint to its scratch directory.
    assert runs["scratch_while_training"] == ["workertemp_1/checkpoints/ckpt-2.index"], runs
    assert runs["chief_stopped_after"] is not None, (
        f"the chief still ran {STOP_TIMEOUT} s after worker 1 was killed: "
        + runs["chief_err"][-3000:])
    print(f"chief stopped {runs['chief_stopped_after']:.1f} s after worker 1 was killed")
    assert runs["chief_code"] == 1, runs["chief_err"][-3000:]
    message = runs["chief_err"].strip().splitlines()[-1]
    assert message.startswith("ltnet train: error: worker 1 "
                              f"(localhost:{runs['ports'][1]}) stopped answering"), message
    assert message.endswith("restart every worker with the same TF_CONFIG (or SLURM step) and "
                            "`ltnet train` resumes from the last checkpoint at step 2"), message
    assert "Traceback" not in runs["chief_err"]
    assert runs["checkpoint_after_kill"] == 2


@pytest.mark.slow
def test_two_workers_resumed_match_one_process_on_two_cpus(cluster_runs):
    runs = cluster_runs
    run, reference = runs["run"], runs["reference"]
    code, out, err = runs["mirrored"]
    assert code == 0, err[-3000:]
    for index, (code, out, err) in enumerate(runs["resumed"]):
        assert code == 0, f"worker {index}: {err[-3000:]}"
        assert "trained 4 steps (resumed from 2)" in out, out[-2000:]

    # Only the chief wrote the run; worker 1's scratch is gone.
    assert not list(run.rglob("workertemp_*")), list(run.rglob("workertemp_*"))
    assert checkpoint_step(run) == 4
    assert any((run / "logs").rglob("*tfevents*"))
    setups = [json.loads((r / "environment.json").read_text()) for r in (run, reference)]
    assert [(s["strategy"], s["workers"], s["replicas"]) for s in setups] == [
        ("MultiWorkerMirroredStrategy", 2, 2), ("MirroredStrategy", 1, 2)], setups

    ours, theirs = history(run), history(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == ["1", "2", "3", "4"]
    for name in ("sim", "smooth", "total", "field_magnitude"):
        np.testing.assert_allclose([float(r[name]) for r in ours],
                                   [float(r[name]) for r in theirs], rtol=0, atol=ATOL,
                                   err_msg=name)
    totals = [float(r["total"]) for r in ours]
    assert len(set(totals)) == 4, totals  # the steps saw different pairs and weights

    ours, theirs = (h5_arrays(r / "forward_generator.h5") for r in (run, reference))
    assert sorted(ours) == sorted(theirs) and len(ours) > 10
    worst = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
    print(f"largest weight difference, two workers vs one process: {worst:.3g}")
    assert worst <= ATOL


# ------------------------------------------------------------------ choosing the strategy

def test_auto_stays_on_mirrored_without_a_cluster(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = choose_strategy("auto")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert worker_role(strategy) == WorkerRole()
    # A TF_CONFIG without a cluster (some launchers set only the task) names no cluster.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"task": {"type": "worker", "index": 0}}))
    assert cluster_resolver() is None
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        choose_strategy("multi-worker")
    with pytest.raises(ValueError, match="multi-worker training only"):
        choose_strategy("mirrored", collective_timeout=30)


@pytest.mark.parametrize("text, problem", [
    ("{'cluster': 1}", "not valid JSON"),
    ('{"cluster": {"worker": "host1:2222"}, "task": {"type": "worker", "index": 0}}',
     "list of host:port"),
    ('{"cluster": {"worker": ["host1:2222"]}, "task": {"type": "chief", "index": 0}}',
     "task must name"),
    ('{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
     '"task": {"type": "worker", "index": 2}}', "index 2 is not one of the 2 worker tasks"),
])
def test_bad_tf_config_is_refused(text, problem):
    with pytest.raises(ValueError, match="TF_CONFIG") as error:
        read_tf_config({"TF_CONFIG": text})
    assert problem in str(error.value)


def test_cli_refuses_multi_worker_without_a_cluster(monkeypatch, tmp_path, capsys):
    from ltnet_keras import cli
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = write_config(tmp_path / "data", tmp_path / "config.yaml", steps=4)
    code = cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                     "--strategy", "multi-worker"])
    assert code == 2
    assert "ltnet train: error: --strategy multi-worker needs TF_CONFIG" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU nodes only")
def test_slurm_step_on_cpu_nodes(monkeypatch):
    """SlurmClusterResolver counts GPUs to place tasks; on CPU nodes the workers get none."""
    with pytest.raises(ValueError, match="SLURM_PROCID is not set"):
        monkeypatch.delenv("SLURM_PROCID", raising=False)
        cluster_resolver("slurm")
    for name, value in {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3",
                        "SLURM_STEP_NODELIST": "node[07-08]",
                        "SLURM_STEP_TASKS_PER_NODE": "2,1"}.items():
        monkeypatch.setenv(name, value)
    resolver = cluster_resolver("slurm")
    assert resolver.cluster_spec().as_dict() == {
        "worker": ["node07:8888", "node07:8889", "node08:8888"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert not resolver.num_accelerators().get("GPU")


def test_worker_lost_message_names_the_peer_and_the_step():
    role = WorkerRole(True, "worker", 0, {"worker": ["host1:2222", "host2:2222"]})
    # The two ways TensorFlow reports a lost peer: its connection reset, its heartbeat missed.
    reset = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
        "information from remote target /job:worker/replica:0/task:1 while calling "
        "/tensorflow.WorkerService/RecvBuf:"))
    silent = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: Error reported from /job:worker/task:1: The following "
        "tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1"))
    for error in (reset, silent):
        message = worker_lost_message(error, role, 6)
        assert message.startswith("worker 1 (host2:2222) stopped answering (UnavailableError: "
                                  "Collective ops is aborted by: "), message
        assert message.endswith("resumes from the last checkpoint at step 6"), message
    assert worker_lost_message(reset, role, None).endswith("starts again from step 0 "
                                                           "(no checkpoint yet)")
    worker = WorkerRole(False, "worker", 1, role.cluster)
    assert worker_lost_message(tf.errors.UnavailableError(None, None, (
        "from remote target /job:worker/replica:0/task:0 while calling")), worker, 2).startswith(
        "worker 0 (host1:2222) stopped answering")
