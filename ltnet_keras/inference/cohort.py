"""Segmenting a cohort: a list of scans, split over the tasks of a job array, resumable.

``ltnet segment --image-list FILE --shard I/N``: every task reads the same list and takes
every N-th scan from the I-th, so N tasks cover the list with no overlap and no gap. Output
names are planned over the WHOLE list (the same name a scan gets in one unsharded run, whatever
the shard), so the tasks' outputs together are exactly one unsharded run's.

A scan is done when its label map exists: the label map is renamed into place last, after
the optional outputs, so it never exists for a scan a killed task left half-written. Done
scans are skipped (unless ``overwrite``), so a re-submitted array resumes. A scan that fails
(an unreadable file, a scan too small for the atlas, a failed registration) is reported and
the cohort goes on; the caller turns failures into a non-zero exit status at the end.
"""
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.inference.outputs import plan_output_paths
from ltnet_keras.inference.scan_job import failure_reason, segment_and_write

#: Exit status of ``ltnet segment`` when some scans of a cohort failed (2: refused up front).
EXIT_SOME_FAILED = 1


def read_image_list(list_file) -> List[Path]:
    """The scans of an image list: one path per line; blank lines and lines starting with
    ``#`` are skipped; a relative path is relative to the list file's folder (so a list and
    its scans move together). Every listed file must exist (checked here, before any work):
    a missing one is a VolumeError naming the list, the line and the path."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise VolumeError(list_file, "image list not found" if not list_file.exists()
                          else "image list is not a file")
    try:
        text = list_file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise VolumeError(list_file, f"cannot read the image list ({error})") from None
    scans = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        if not path.is_file():
            problem = "is a folder, not a file" if path.is_dir() else "no such file"
            raise VolumeError(list_file, f"line {number}: {entry}: {problem}"
                              + ("" if str(path) == entry else f" ({path})"))
        scans.append(path)
    if not scans:
        raise VolumeError(list_file, "the image list names no scans (blank lines and '#' "
                                     "comments are skipped)")
    return scans


@dataclass(frozen=True)
class Shard:
    """Task ``index`` of ``count``: takes items ``index, index + count, ...``."""
    index: int
    count: int

    def take(self, items: Sequence) -> list:
        return list(items[self.index::self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` with ``0 <= I < N`` (e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``
    for an array ``--array=0-(N-1)``), else ValueError saying what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"--shard {text!r}: expected I/N, two whole numbers with 0 <= I < N "
                         "(e.g. 0/4 ... 3/4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ValueError(f"--shard {text!r}: N must be at least 1")
    if index >= count:
        raise ValueError(f"--shard {text!r}: I must be 0 ... {count - 1} (tasks count from 0)")
    return Shard(index, count)


@dataclass
class CohortSummary:
    """What one ``segment`` process did with its scans."""
    shard: Optional[Shard]
    segmented: List[Path] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)
    failed: List[Tuple[Path, str]] = field(default_factory=list)

    @property
    def scans(self) -> int:
        return len(self.segmented) + len(self.skipped) + len(self.failed)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0

    def line(self) -> str:
        """``shard 1/3: 4 scans: 3 segmented, 1 skipped (output exists; --overwrite to redo),
        0 failed``."""
        where = f"shard {self.shard}: " if self.shard else ""
        return (f"{where}{self.scans} scans: {len(self.segmented)} segmented, "
                f"{len(self.skipped)} skipped (output exists; --overwrite to redo), "
                f"{len(self.failed)} failed")


def optional_outputs(save_warped_atlas=False, save_field=False, save_aligned=False,
                     save_brain_mask=False) -> List[str]:
    """The keys of :func:`~ltnet_keras.inference.outputs.output_paths` written besides the
    label map. ``save_aligned`` only counts for scans that are aligned (``--align affine``):
    without an alignment nothing is written there."""
    return [key for key, wanted in (("warped_atlas", save_warped_atlas),
                                    ("forward_field", save_field),
                                    ("aligned", save_aligned),
                                    ("alignment", save_aligned),
                                    ("brain_mask", save_brain_mask)) if wanted]


def plan_cohort(images: Sequence[Path], out_dir, extras: Sequence[str],
                shard: Optional[Shard] = None) -> List[Tuple[Path, Dict[str, Path]]]:
    """``(scan, output paths)`` of this task's scans. Names come from the whole list (see the
    module doc); a scan listed twice, two scans with one output or an output that would
    replace a listed scan is refused (VolumeError) before any work. Existing outputs are not
    refused here: :func:`segment_cohort` skips or replaces them."""
    plans = plan_output_paths(images, out_dir, overwrite=True, extras=extras)
    pairs = list(zip(images, plans))
    return shard.take(pairs) if shard else pairs


def _existing_outputs(paths: Dict[str, Path], extras: Sequence[str]) -> Tuple[bool, List[Path]]:
    """(label map exists, the requested optional outputs that do not). A brain mask is only
    written for whole-head scans, so its absence says nothing."""
    return paths["labels"].exists(), [paths[key] for key in extras
                                      if key != "brain_mask" and not paths[key].exists()]


def segment_cohort(make_segmenter: Callable[[], object],
                   planned: Sequence[Tuple[Path, Dict[str, Path]]],
                   shard: Optional[Shard] = None, overwrite: bool = False,
                   save_warped_atlas: bool = False, save_field: bool = False,
                   save_aligned: bool = False, save_brain_mask: bool = False,
                   scan_outputs=None,
                   report: Callable[[str], None] = print,
                   report_error: Optional[Callable[[str], None]] = None,
                   jobs=1, summary: Optional[CohortSummary] = None) -> CohortSummary:
    """Segment ``planned`` scans (:func:`plan_cohort`) one after another with the segmenter
    ``make_segmenter()`` returns (a :class:`~ltnet_keras.inference.segment.Segmenter` or a
    multi-atlas one), built only if some scan needs it: a finished task re-submitted loads no
    network. Pass ``save_aligned`` only when the segmenter aligns (:func:`optional_outputs`).
    ``scan_outputs``: a :class:`~ltnet_keras.inference.scan_records.ScanOutputs` writing each
    scan's record (volumes, QC) and picture with its outputs.

    Without ``overwrite`` a scan whose label map and requested optional outputs all exist is
    skipped; a scan whose label map exists but an optional output asked for now does not (an
    earlier run without ``--save-field``, say) fails with a message, and nothing of it is
    replaced. Any error while segmenting or writing a scan is reported through
    ``report_error`` (default: standard error) and counted; the next scan goes on. Errors
    building the segmenter (a bad run directory) are raised: they concern every scan.

    ``jobs`` (a number or ``"auto"``) > 1: the scans to do are shared among that many worker
    processes (at most one per scan), each with one thread and its own segmenter
    (:func:`ltnet_keras.inference.parallel.segment_in_workers`; ``make_segmenter`` must then
    pickle); the files written are the same. Ctrl-C or a worker dying raises
    :class:`~ltnet_keras.inference.parallel.CohortStopped`, ``summary`` (filled in place when
    given) holding what was done."""
    report_error = report_error or (lambda text: print(text, file=sys.stderr, flush=True))
    options = dict(save_warped_atlas=save_warped_atlas, save_field=save_field,
                   save_aligned=save_aligned, save_brain_mask=save_brain_mask)
    extras = optional_outputs(**options)
    summary = summary if summary is not None else CohortSummary(shard)

    def fail(image, reason):
        summary.failed.append((image, reason))
        report_error(f"failed: {image}: {reason}")

    todo = []
    for image, paths in planned:
        has_labels, missing = _existing_outputs(paths, extras)
        if overwrite or not has_labels:
            todo.append((image, paths))
        elif missing:
            fail(image, f"{paths['labels']} exists but not {missing[0]} (an earlier run without "
                        "this option?); --overwrite redoes the scan")
        else:
            summary.skipped.append(image)
    if jobs != 1 and len(todo) > 1:
        from ltnet_keras.inference.parallel import resolve_jobs, segment_in_workers
        workers = resolve_jobs(jobs, len(todo))
        if workers > 1:
            segment_in_workers(make_segmenter, todo, workers, options, scan_outputs, summary,
                               report, fail)
            return summary
    segmenter = make_segmenter() if todo else None
    for image, paths in todo:
        try:
            line = segment_and_write(segmenter, image, paths, options, scan_outputs)
        except Exception as error:  # one bad scan must not stop a cohort of hundreds
            fail(image, failure_reason(error))
            continue
        summary.segmented.append(image)
        report(line)
    return summary
