"""Training steps of a config at its own grid on a synthetic pair: seconds per step and peak
resident memory (the paper-scale configs, ``experiments/configs/paper_scale/``).

Step time and memory depend on the grid, the networks and the active terms, not on what the
images show, so a random pair of the config's network shape stands in for the data: the
measurement needs no data on the disk and no time spent preparing it.

:func:`measure_in_fresh_process` runs one measurement in a new Python process (the caller
gives the command), so each peak is that config's alone, and stops the process if its
resident memory passes a limit: on a shared machine an over-large step is recorded as such,
not swapped or killed by the kernel.
"""
import json
import os
import platform
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras.config import ExperimentConfig
from ltnet_keras.records import package_versions

#: Label channels of LPBA40 (56 structures and background): the one-hot maps of the label
#: terms scale with it.
LPBA40_LABEL_CHANNELS = 57
#: The line of a child's standard output that carries its :class:`StepReport` as JSON.
RESULT_PREFIX = "STEP_REPORT "


def channel_overrides(enc: Optional[Sequence[int]] = None, dec: Optional[Sequence[int]] = None,
                      disc: Optional[Sequence[int]] = None) -> Dict[str, List[int]]:
    """Dotted config overrides (for :func:`ltnet_keras.config.load_config`) that narrow the
    networks and change nothing else; each list keeps the config's own length."""
    named = {"network.enc_features": enc, "network.dec_features": dec,
             "network.disc_features": disc}
    return {key: [int(c) for c in value] for key, value in named.items() if value}


def synthetic_pair(shape: Sequence[int], label_channels: int = LPBA40_LABEL_CHANNELS,
                   seed: int = 0) -> dict:
    """A batch of one random (atlas, atlas labels, target) pair on ``shape``, with the keys
    and dtypes :meth:`ltnet_keras.models.ltnet.LTNet.train_step` takes from the data
    pipeline."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, label_channels, (1, *shape)).astype(np.int32)
    return {"atlas": tf.constant(rng.random((1, *shape, 1), dtype=np.float32)),
            "atlas_labels": tf.one_hot(labels, label_channels),
            "atlas_label_index": tf.constant(labels),
            "target": tf.constant(rng.random((1, *shape, 1), dtype=np.float32))}


def peak_resident_gib() -> float:
    """This process' peak resident memory (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


@dataclass
class StepReport:
    """What :func:`run_training_steps` measured."""
    network_shape: List[int]
    networks: Dict[str, List[int]]
    label_channels: int
    warmup_seconds: float
    step_seconds: List[float]
    total_losses: List[float]
    #: Largest change of any G_F weight over the steps: 0 would mean nothing was learned.
    forward_weight_change: float
    #: ``(batch, x, y, z, 3)`` of G_F's field on the pair after the steps.
    forward_field_shape: List[int]
    peak_gib: float
    extra: dict = field(default_factory=dict)

    @property
    def mean_step_seconds(self) -> float:
        return float(np.mean(self.step_seconds)) if self.step_seconds else float("nan")


def run_training_steps(config: ExperimentConfig, steps: int = 2, warmup: int = 1,
                       label_channels: int = LPBA40_LABEL_CHANNELS,
                       seed: int = 0) -> StepReport:
    """Build ``config``'s LT-Net on its network grid (``data.crop_shape / data.factor``) and run
    ``warmup`` untimed steps (the first one traces the graph) and ``steps`` timed ones, all on
    one synthetic pair, batch 1, one replica."""
    import tensorflow as tf

    from ltnet_keras.training import build_model
    if steps < 0 or warmup < 0 or steps + warmup < 1:
        raise ValueError(f"steps ({steps}) and warmup ({warmup}) must be >= 0, one of them > 0")
    tf.keras.utils.set_random_seed(seed)
    shape = tuple(config.data.network_shape)
    batch = synthetic_pair(shape, label_channels, seed)
    model = build_model(config, shape)
    step = tf.function(model.train_step, jit_compile=config.train.jit_compile)
    before = [w.numpy().copy() for w in model.forward_generator.weights]

    def timed_step():
        clock = time.perf_counter()
        logs = step(batch)
        total = float(logs["total"].numpy())
        return time.perf_counter() - clock, total

    warmup_seconds, losses, seconds = 0.0, [], []
    for _ in range(warmup):
        elapsed, total = timed_step()
        warmup_seconds += elapsed
        losses.append(total)
    for _ in range(steps):
        elapsed, total = timed_step()
        seconds.append(elapsed)
        losses.append(total)
    change = max(float(np.max(np.abs(w.numpy() - b)))
                 for w, b in zip(model.forward_generator.weights, before))
    forward_field = model.forward_generator([batch["atlas"], batch["target"]], training=False)
    network = config.network
    return StepReport(
        network_shape=list(shape),
        networks={"enc_features": list(network.enc_features),
                  "dec_features": list(network.dec_features),
                  "disc_features": (list(network.disc_features)
                                    if model.discriminator is not None else [])},
        label_channels=label_channels, warmup_seconds=warmup_seconds, step_seconds=seconds,
        total_losses=losses, forward_weight_change=change,
        forward_field_shape=list(forward_field.shape), peak_gib=peak_resident_gib())


def report_line(report: StepReport) -> str:
    """The child's result line (:data:`RESULT_PREFIX` + JSON)."""
    return RESULT_PREFIX + json.dumps(asdict(report))


def _resident_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def measure_in_fresh_process(command: Sequence[str], memory_limit_gib: float,
                             poll_seconds: float = 0.5, timeout_seconds: float = 6 * 3600
                             ) -> dict:
    """Run ``command`` (a child that prints :func:`report_line`) and return
    ``{"status": "ok" | "over_memory_limit" | "failed", "report": dict or None,
    "peak_gib": ..., "seconds": ..., "mean_load": ..., "error": ...}`` (``mean_load``: the
    machine's 1-minute load average, averaged over the run).

    The child's resident memory is read every ``poll_seconds``; past ``memory_limit_gib`` it
    is killed and the status says so (``peak_gib`` is then the last reading, a lower bound of
    what the step needs). ``peak_gib`` of a finished child is its own ``VmHWM``."""
    clock = time.perf_counter()
    child = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    highest, status, loads = 0.0, None, []
    while child.poll() is None:
        highest = max(highest, _resident_gib(child.pid))
        # Other tenants' jobs stretch the step times: the load shows how busy the machine was.
        loads.append(os.getloadavg()[0])
        if highest > memory_limit_gib:
            child.kill()
            status = "over_memory_limit"
            break
        if time.perf_counter() - clock > timeout_seconds:
            child.kill()
            status = "failed"
            break
        time.sleep(poll_seconds)
    out, err = child.communicate()
    seconds = time.perf_counter() - clock
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if status is None and child.returncode == 0 and lines:
        report = json.loads(lines[-1][len(RESULT_PREFIX):])
        return {"status": "ok", "report": report, "peak_gib": report["peak_gib"],
                "seconds": seconds, "mean_load": _mean(loads), "error": ""}
    error = ("" if status == "over_memory_limit"
             else f"exit status {child.returncode}: {err.strip()[-2000:]}")
    return {"status": status or "failed", "report": None, "peak_gib": highest,
            "seconds": seconds, "mean_load": _mean(loads), "error": error}


def _mean(values) -> Optional[float]:
    return round(float(np.mean(values)), 2) if values else None


def environment() -> dict:
    """Versions and machine facts recorded beside measured numbers (no paths)."""
    return {"packages": package_versions(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}


def results_markdown(record: dict) -> str:
    """A Markdown table of a record ``{"command", "memory_limit_gib", "rows": [{"config",
    "overrides", "status", "peak_gib", "report", ...}], "environment"}``."""
    lines = ["# Paper-scale training steps: seconds and peak memory",
             "", f"`{record['command']}`", "",
             "| config | overrides | grid | networks (enc / dec / disc) | status | "
             "s/step (warm-up) | peak GiB | load |", "|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        report = row["report"] or {}
        nets = report.get("networks", {})
        networks = " / ".join(",".join(map(str, nets.get(k) or ["-"]))
                              for k in ("enc_features", "dec_features", "disc_features"))
        seconds = report.get("step_seconds") or []
        timing = (f"{np.mean(seconds):.1f} ({report['warmup_seconds']:.1f})" if seconds
                  else "-")
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "-"
        status = row["status"] + (f" (> {record['memory_limit_gib']} GiB)"
                                  if row["status"] == "over_memory_limit" else "")
        grid = "x".join(map(str, report.get("network_shape", []))) or "-"
        lines.append(f"| `{row['config']}` | {overrides} | {grid} | {networks or '-'} | "
                     f"{status} | {timing} | {row['peak_gib']:.2f} | "
                     f"{row.get('mean_load') or '-'} |")
    versions = record["environment"]["packages"]
    lines += ["", "Batch 1, one replica, a random pair of the config's grid with "
              f"{record['label_channels']} label channels; peak = the fresh process' VmHWM "
              "(TensorFlow, the model and the step together); load = the machine's 1-minute load "
              "average over the run (2 cores: above 2, other jobs took part of the CPU). "
              "Versions: "
              + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "; "
              + f"{record['environment']['cpus']} CPUs, {record['environment']['platform']}."]
    return "\n".join(lines) + "\n"
