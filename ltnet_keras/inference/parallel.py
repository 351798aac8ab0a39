"""``ltnet segment --jobs N``: scans segmented by N worker processes at once.

Each worker is a fresh process (multiprocessing's ``spawn``: TensorFlow is not fork-safe) with
ONE thread for TensorFlow (intra- and inter-op), ITK and OpenMP; it builds its own segmenter
once and then takes scans from the parent, one at a time, as it becomes free. A worker does to
a scan exactly what one process does (:func:`~ltnet_keras.inference.scan_job.segment_and_write`:
outputs first, label map last), so the files are the same as one process writes; only the
order in which scans finish (and their progress lines) changes. The parent alone prints, counts
and, at the end, rebuilds the tables from the records.

Ctrl-C (or a worker dying) stops every worker: a scan in progress keeps no label map (a
temporary one left by a killed worker is removed), so it counts as not done and a rerun
resumes; :class:`CohortStopped` says so.
"""
import contextlib
import os
import pickle
import queue
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

#: The variables every worker starts with: one thread for each library that has a pool.
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
              "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
              "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def worker_environment() -> Dict[str, str]:
    """:data:`ONE_THREAD`, but ITK's thread count as the user set it, if they did: ANTs'
    affine moves by ~0.1 mm with it (``data.align.load_ants``), and a worker must register a
    scan as the serial run would (measured: 0.01 Dice apart on FreeSurfer scans otherwise)."""
    values = dict(ONE_THREAD)
    values["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = os.environ.get(
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    return values

#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: Seconds the workers get to finish cleanly after an interrupt before they are killed.
STOP_GRACE = 20.0


class CohortStopped(RuntimeError):
    """The workers were stopped before every scan was done (Ctrl-C, a worker died); the
    message says what happened. ``exit_code``: what ``ltnet segment`` returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a job scheduler's allotment)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:   # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def parse_jobs(text: str) -> Union[int, str]:
    """``--jobs``: a whole number >= 1 or ``auto``; else ValueError saying what is wrong."""
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    try:
        jobs = int(value)
    except ValueError:
        raise ValueError(f"--jobs {text!r}: expected a whole number of processes (1: one "
                         "process, as without --jobs) or 'auto' (one per usable core)") from None
    if jobs < 1:
        raise ValueError(f"--jobs {text!r}: at least 1 process")
    return jobs


#: Memory ``auto`` plans per worker: the peak of one worker was 1.4 GiB on LPBA40 scans, 1.9 GiB
#: on FreeSurfer's 256^3 scans aligned, 2.3 GiB on a whole head, plus what a check keeps.
WORKER_MEMORY_GIB = 3.0


def available_memory_gib() -> Optional[float]:
    """``MemAvailable`` of ``/proc/meminfo`` (GiB), None where there is none."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve_jobs(jobs: Union[int, str], scans: int) -> int:
    """How many processes to run, never more than the scans: ``auto`` = the usable cores, and
    no more workers than the available memory holds at :data:`WORKER_MEMORY_GIB` each (a
    64-core node with 64 GiB gets 21, not 64)."""
    wanted = usable_cores() if jobs == "auto" else int(jobs)
    memory = available_memory_gib() if jobs == "auto" else None
    if memory is not None:
        wanted = min(wanted, int(memory // WORKER_MEMORY_GIB))
    return max(1, min(wanted, scans))


@contextlib.contextmanager
def _environment(values: Dict[str, str]):
    """``os.environ`` with ``values`` while the block runs (a spawned child copies it)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _portable(error: BaseException) -> bytes:
    """The error pickled for the parent (re-raised there), or a RuntimeError with its text."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))


def _start_worker(payload: bytes):
    """TensorFlow with one thread, its start-up log filtered as ``ltnet`` does (the modules
    the worker needs import it); then the worker's ``payload`` unpickled."""
    import ltnet_keras  # noqa: F401  (environment set-up before TensorFlow)
    from ltnet_keras._compat import native_stderr_filtered, start_tensorflow_quietly
    tf = start_tensorflow_quietly()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:   # already initialised: the environment above said 1 already
        pass
    with native_stderr_filtered():
        import ltnet_keras.inference.scan_job  # noqa: F401  (TensorFlow's Keras, voxelmorph)
        return pickle.loads(payload)


def _worker(number: int, payload: bytes, inbox, outbox):
    """One worker: build the segmenter, then do tasks ``(index, kind, image, paths)`` until
    ``None``; ``kind`` "check" reads and checks a scan (``Segmenter.prepare``), "segment"
    segments it and writes its outputs. Ends on its own when the parent is gone.
    ``payload``: ``(make_segmenter, options, scan_outputs)`` pickled, read once TensorFlow
    is set up."""
    from ltnet_keras._compat import end_process_now
    parent = os.getppid()
    try:
        make_segmenter, options, scan_outputs = _start_worker(payload)
        from ltnet_keras.inference.scan_job import failure_reason, segment_and_write
        try:
            segmenter = make_segmenter()
        except Exception as error:
            outbox.put(("error", number, _portable(error)))
            return
        outbox.put(("ready", number))
        while True:
            try:
                task = inbox.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if task is None:   # done: what it said reaches the parent, then no teardown
                outbox.close()
                outbox.join_thread()
                end_process_now(0)
            index, kind, image, paths = task
            try:
                if kind == "check":
                    segmenter.prepare(image, keep=True)
                    line = ""
                else:
                    line = segment_and_write(segmenter, image, paths, options, scan_outputs)
            except Exception as error:   # the parent decides: go on, or stop the batch
                outbox.put(("failed", number, index, failure_reason(error), _portable(error)))
                continue
            outbox.put(("done", number, index, line))
    except KeyboardInterrupt:   # Ctrl-C reaches every process of the terminal's group
        sys.exit(EXIT_INTERRUPTED)


#: A task: ``(index, kind, image, paths, worker)``; ``worker``: which one must do it (None: any).
Task = Tuple[int, str, Path, Dict[str, Path], Optional[int]]


class WorkerPool:
    """``jobs`` spawned :func:`_worker` processes and the parent's side of them."""

    def __init__(self, make_segmenter, jobs: int, options: dict, scan_outputs=None):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.outbox = context.Queue()
        self.inboxes = [context.Queue() for _ in range(jobs)]
        payload = pickle.dumps((make_segmenter, options, scan_outputs))
        self.processes = [context.Process(
            target=_worker, name=f"ltnet-segment-{n}", daemon=True,
            args=(n, payload, self.inboxes[n], self.outbox)) for n in range(jobs)]
        self.current: Dict[int, Task] = {}     # worker -> the task it is doing
        self.ready = set()
        with _environment(worker_environment()):
            for process in self.processes:
                process.start()

    def run(self, tasks: Sequence[Task], on_done: Callable[[Task, str], None],
            on_failed: Callable[[Task, str, bytes], bool]) -> None:
        """Hand ``tasks`` out to free workers (in order; a task bound to a worker waits for
        it) until all are done. ``on_failed`` returns whether to go on; False stops here."""
        pending = list(tasks)
        while pending or self.current:
            for number in sorted(self.ready - set(self.current)):
                task = next((t for t in pending if t[4] in (None, number)), None)
                if task is not None:
                    pending.remove(task)
                    self.current[number] = task
                    self.inboxes[number].put(task[:4])
            message = self._next_message()
            kind, number = message[0], message[1]
            if kind == "ready":
                self.ready.add(number)
            elif kind == "error":   # the segmenter could not be built: concerns every scan
                raise pickle.loads(message[2])
            elif kind == "done":
                on_done(self.current.pop(number), message[3])
            elif kind == "failed":
                if not on_failed(self.current.pop(number), message[3], message[4]):
                    return

    def _next_message(self):
        while True:
            try:
                return self.outbox.get(timeout=0.5)
            except queue.Empty:
                pass
            dead = [n for n, p in enumerate(self.processes) if p.exitcode is not None]
            if dead:
                try:   # what it said before it ended comes first
                    return self.outbox.get(timeout=1.0)
                except queue.Empty:
                    raise self._died(dead[0]) from None

    def _died(self, number: int) -> CohortStopped:
        code = self.processes[number].exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and
               -code in signal.Signals._value2member_map_ else f"ended with exit code {code}")
        task = self.current.get(number)
        doing = (f" while segmenting {task[2]}" if task and task[1] == "segment"
                 else f" while checking {task[2]}" if task else
                 " while loading the run" if number not in self.ready else "")
        return CohortStopped(f"worker process {number + 1} of {len(self.processes)} (pid "
                             f"{self.processes[number].pid}) {how}{doing} (out of memory?); "
                             "the other workers were stopped", 1)

    def close(self, interrupt: bool = False) -> None:
        """Stop the workers: ``None`` to each (they finish their task), or with ``interrupt``
        SIGINT (they drop it, removing their temporary files); any still running after
        :data:`STOP_GRACE` seconds is terminated, then killed. Temporary label maps of the
        tasks in progress are removed (a killed worker cannot)."""
        from ltnet_keras.inference.scan_job import remove_partial_labels
        for number, process in enumerate(self.processes):
            if process.exitcode is None:
                if interrupt:
                    with contextlib.suppress(OSError):
                        os.kill(process.pid, signal.SIGINT)
                else:
                    self.inboxes[number].put(None)
        deadline = time.monotonic() + STOP_GRACE
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0.1))
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
                process.join(5.0)
            if process.exitcode is None:
                process.kill()
                process.join()
        for _, kind, image, paths, _ in self.current.values():
            if kind == "segment":
                remove_partial_labels(image, paths)
        for channel in [self.outbox] + self.inboxes:
            channel.cancel_join_thread()
            channel.close()


@contextlib.contextmanager
def _workers(make_segmenter, jobs: int, options: dict, scan_outputs, total: int,
             finished: Callable[[], int]):
    """A :class:`WorkerPool`, always closed when the block ends (stopped at once if it ends
    by an exception); Ctrl-C and a dead worker become :class:`CohortStopped` saying how many
    of the ``total`` scans were done (``finished()``) and that a rerun resumes."""
    pool = None
    try:
        pool = WorkerPool(make_segmenter, jobs, options, scan_outputs)
        yield pool
    except (KeyboardInterrupt, CohortStopped) as error:
        if pool is not None:
            pool.close(interrupt=True)
            pool = None
        what = ("interrupted" if isinstance(error, KeyboardInterrupt)
                else f"{error}; stopped")
        raise CohortStopped(f"{what} after {finished()} of {total} scans were segmented; the "
                            "scans in progress were dropped and left no label map (run the "
                            "same command again to resume)",
                            getattr(error, "exit_code", EXIT_INTERRUPTED)) from None
    except BaseException:
        if pool is not None:
            pool.close(interrupt=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()


def segment_in_workers(make_segmenter, todo: Sequence[Tuple[Path, Dict[str, Path]]], jobs: int,
                       options: dict, scan_outputs, summary, report: Callable[[str], None],
                       fail: Callable[[Path, str], None]) -> None:
    """A cohort's scans ``todo`` (``(scan, output paths)``) on ``jobs`` workers, any scan to
    any free worker; each segmented scan is reported and added to ``summary.segmented`` (in
    list order at the end), each failed one goes to ``fail`` and the others go on."""
    done: List[int] = []

    def on_done(task, line):
        done.append(task[0])
        report(line)

    def on_failed(task, reason, error):
        fail(task[2], reason)
        return True

    tasks = [(i, "segment", image, paths, None) for i, (image, paths) in enumerate(todo)]
    try:
        with _workers(make_segmenter, resolve_jobs(jobs, len(todo)), options, scan_outputs,
                      len(todo), lambda: len(done)) as pool:
            pool.run(tasks, on_done, on_failed)
    finally:
        summary.segmented.extend(todo[i][0] for i in sorted(done))


def segment_batch_in_workers(make_segmenter, planned: Sequence[Tuple[Path, Dict[str, Path]]],
                             jobs: int, options: dict, scan_outputs,
                             report: Callable[[str], None]) -> None:
    """``--image`` scans on ``jobs`` workers, as one process does them: every scan is checked
    before the first output is written, and the first error (in the order given) is raised
    with nothing written; then they are segmented, each by the worker that checked it (its
    alignment is kept there). An error while segmenting stops the batch and is raised."""
    errors: Dict[int, bytes] = {}
    done: List[int] = []
    workers = resolve_jobs(jobs, len(planned))

    def on_done(task, line):
        if task[1] == "segment":
            done.append(task[0])
            report(line)

    def on_failed(task, reason, error):
        errors[task[0]] = error
        return task[1] == "check"   # every check runs, to raise the first in list order

    with _workers(make_segmenter, workers, options, scan_outputs, len(planned),
                  lambda: len(done)) as pool:
        for kind in ("check", "segment"):
            pool.run([(i, kind, image, paths, i % workers)
                      for i, (image, paths) in enumerate(planned)], on_done, on_failed)
            if errors:
                raise pickle.loads(errors[min(errors)])
