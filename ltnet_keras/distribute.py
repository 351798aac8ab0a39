"""Where a training runs: this machine's devices, or several processes (machines) together.

* ``MirroredStrategy`` over this machine's GPUs, else over its logical CPUs.
* ``MultiWorkerMirroredStrategy`` over the processes a cluster names: ``TF_CONFIG`` (JSON, one
  per process) or the SLURM job step (``SlurmClusterResolver``). Every process trains the same
  model on its own replicas' pairs and the gradients are summed across them every step.

The chief (``chief`` task, else ``worker`` 0) alone writes the run directory. Saving a
checkpoint is a collective, so the other workers save too, into ``<run>/workertemp_<task id>``
(TensorFlow's multi-worker guide), which they delete when they stop. On resume every worker
restores the chief's checkpoint (a restore on the chief alone puts the workers' collectives
out of step), so, as in the guide, the run directory (and the data) must be on a disk that
every machine sees.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multi-worker")
CLUSTERS = ("tf-config", "slurm")

# What a collective raises when a peer dies (gRPC connection reset, coordination-service
# heartbeat missed) or when --collective-timeout runs out.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                 tf.errors.InternalError, tf.errors.CancelledError, tf.errors.AbortedError)


class WorkerLostError(RuntimeError):
    """A worker of a multi-worker training stopped answering; the run can be resumed."""


def make_strategy(devices: int = 0) -> tf.distribute.Strategy:
    """MirroredStrategy over the GPUs, else over the logical CPUs (one unless split).

    ``devices`` > 0 uses only the first ``devices`` of them.
    """
    gpus = tf.config.list_logical_devices("GPU")
    pool = gpus or tf.config.list_logical_devices("CPU")
    if devices:
        if devices > len(pool):
            raise ValueError(f"{devices} devices asked for, {len(pool)} available: "
                             f"{[d.name for d in pool]}")
        pool = pool[:devices]
    return tf.distribute.MirroredStrategy([d.name for d in pool])


def split_cpu(n: int) -> None:
    """Split the CPU into ``n`` logical devices (before TensorFlow initialises its devices)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def read_tf_config(environ=None) -> Optional[dict]:
    """``TF_CONFIG`` checked, or ``None`` when it is unset or names no cluster."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text!r}") from None
    cluster = value.get("cluster") if isinstance(value, dict) else None
    if not cluster:
        return None
    example = ('e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not isinstance(cluster, dict) or not all(
            isinstance(hosts, list) and hosts and all(
                isinstance(h, str) and re.fullmatch(r"[^:\s]+:\d+", h) for h in hosts)
            for hosts in cluster.values()):
        raise ValueError(f"TF_CONFIG cluster must map each job to a list of host:port; got "
                         f"{cluster!r} ({example})")
    task = value.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(f"TF_CONFIG task must name this process' job, one of "
                         f"{sorted(cluster)}; got {task!r} ({example})")
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise ValueError(f"TF_CONFIG task index {index!r} is not one of the "
                         f"{len(cluster[task['type']])} {task['type']} tasks of the cluster")
    return value


def _slurm_resolver():
    """``SlurmClusterResolver`` for this SLURM task; on nodes without a GPU too."""
    from tensorflow.python.distribute.cluster_resolver import SimpleClusterResolver
    if "SLURM_PROCID" not in os.environ:
        raise ValueError("--cluster slurm: SLURM_PROCID is not set; start one `ltnet train` "
                         "per task with srun inside a SLURM job")
    Slurm = tf.distribute.cluster_resolver.SlurmClusterResolver
    if tf.config.list_physical_devices("GPU"):
        return Slurm()  # shares each node's GPUs among its tasks (CUDA_VISIBLE_DEVICES)
    # The resolver places tasks on ports by counting GPUs and cannot count zero: let it place
    # them as if each task had one, then declare none, so each worker trains on its CPU.
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")
    most = max(int(re.match(r"\d+", part).group()) for part in per_node.split(","))
    slurm = Slurm(gpus_per_node=most, gpus_per_task=1, auto_set_gpu=False)
    spec = slurm.cluster_spec()
    return SimpleClusterResolver(spec, task_type=slurm.task_type, task_id=slurm.task_id,
                                 num_accelerators={}, rpc_layer="grpc")


def cluster_resolver(cluster: str = "tf-config", required: bool = False):
    """The cluster this process belongs to, or ``None`` (TF_CONFIG names none, not required)."""
    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster {cluster!r}: expected one of {', '.join(CLUSTERS)}")
    if cluster == "slurm":
        return _slurm_resolver()
    if read_tf_config() is None:
        if required:
            raise ValueError("--strategy multi-worker needs TF_CONFIG naming the cluster and "
                             "this process' task (or --cluster slurm)")
        return None
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def choose_strategy(kind: str = "auto", cluster: str = "tf-config", devices: int = 0,
                    collective_timeout: Optional[float] = None) -> tf.distribute.Strategy:
    """The strategy ``ltnet train`` uses; create it before any other TensorFlow op.

    ``auto``: multi-worker when TF_CONFIG names a cluster or ``cluster`` is ``slurm``, else
    mirrored. ``collective_timeout`` (s) bounds every collective of a multi-worker run (a
    worker that hangs without dying); a dead worker is noticed within ~10 s without it.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"--strategy {kind!r}: expected one of {', '.join(STRATEGIES)}")
    if collective_timeout is not None and collective_timeout <= 0:
        raise ValueError(f"--collective-timeout must be positive; got {collective_timeout}")
    resolver = None
    if kind != "mirrored":
        resolver = cluster_resolver("slurm" if cluster == "slurm" else cluster,
                                    required=kind == "multi-worker")
    if resolver is None:
        if collective_timeout is not None:
            raise ValueError("--collective-timeout applies to multi-worker training only")
        return make_strategy(devices)
    if devices:
        raise ValueError(f"train.devices ({devices}) applies to one-machine training; with "
                         "several workers each uses all of its GPUs (or its CPU): choose them "
                         "with CUDA_VISIBLE_DEVICES")
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                     communication_options=options)


@dataclass(frozen=True)
class WorkerRole:
    """This process' place in the training: the chief writes the run, the others do not."""
    is_chief: bool = True
    task_type: Optional[str] = None
    task_id: Optional[int] = None
    cluster: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def multi_worker(self) -> bool:
        return bool(self.cluster)

    @property
    def workers(self) -> int:
        return sum(len(hosts) for job, hosts in self.cluster.items()
                   if job in ("chief", "worker")) or 1

    def describe(self, task_type: str, task_id: int) -> str:
        hosts = self.cluster.get(task_type, [])
        address = f" ({hosts[task_id]})" if task_id < len(hosts) else ""
        return f"{task_type} {task_id}{address}"

    def write_dir(self, run_dir: Path) -> Path:
        """Where this process writes: the run directory for the chief, else a temporary
        ``workertemp_<task id>`` inside it (to be deleted)."""
        return Path(run_dir) if self.is_chief else Path(run_dir) / f"workertemp_{self.task_id}"


def worker_role(strategy) -> WorkerRole:
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerRole()
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not spec:
        return WorkerRole()
    return WorkerRole(bool(strategy.extended.should_checkpoint), resolver.task_type,
                      int(resolver.task_id), {job: list(hosts) for job, hosts in spec.items()})


def strategy_name(strategy) -> str:
    """The public name (``MultiWorkerMirroredStrategy``'s class is called otherwise)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def fresh_dir(path: Path) -> Path:
    """``path`` emptied (a killed worker may have left its temporary directory behind)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def worker_batches(strategy, global_batches: Callable[[], tf.data.Dataset]):
    """The batches of ``global_batches()`` (one pair per replica, in replica order) shared out
    so that each worker reads only its own replicas' pairs: replica ``r`` gets element ``r``
    of each global batch on every strategy, so the pairs stay a function of (seed, step,
    replica) whatever the number of workers."""
    replicas = strategy.num_replicas_in_sync

    def for_worker(context: tf.distribute.InputContext):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        return global_batches().map(
            lambda batch: {name: value[first:first + local] for name, value in batch.items()})
    return strategy.distribute_datasets_from_function(for_worker)


_TASK_IN_MESSAGE = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")


def worker_lost_message(error: Exception, role: WorkerRole, checkpoint_step: Optional[int]) -> str:
    """What to tell the user when a collective failed: which peer, and how to go on."""
    peers = [(job, int(task)) for job, task in _TASK_IN_MESSAGE.findall(str(error))
             if (job, int(task)) != (role.task_type, role.task_id)]
    who = role.describe(*peers[0]) if peers else "another worker"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = next((line for line in str(error).splitlines()
                   if "aborted by" in line or "unhealthy" in line), first_line)
    resume = (f"resumes from the last checkpoint at step {checkpoint_step}"
              if checkpoint_step is not None else "starts again from step 0 (no checkpoint yet)")
    return (f"{who} stopped answering ({type(error).__name__}: {detail.strip()}); "
            f"restart every worker with the same TF_CONFIG (or SLURM step) and `ltnet train` "
            f"{resume}")
