"""One scan of a cohort, from its path to its files on disk: segmented, then its outputs
written with the label map last, so a label map on disk means a complete scan. Shared by the
cohort loop (:mod:`ltnet_keras.inference.cohort`) and its worker processes
(:mod:`ltnet_keras.inference.parallel`)."""
import os
import secrets
from pathlib import Path
from typing import Dict

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import output_suffix
from ltnet_keras.inference.outputs import write_segmentation


def _partial_name(final: Path, image, tag: str) -> Path:
    ext = output_suffix(image)
    return final.with_name(f".{final.name[:-len(ext)]}.partial-{tag}{ext}")


def remove_partial_labels(image, paths: Dict[str, Path]) -> None:
    """Remove the temporary label maps a killed process left for this scan (none on a clean
    exit: :func:`_write_labels_last` removes its own), and ``save_volume``'s own temporary
    file of one."""
    ext = output_suffix(image)
    pattern = _partial_name(paths["labels"], image, "*")
    for glob in (pattern.name, f".{pattern.name[:-len(ext)]}.tmp-*{ext}"):
        for leftover in pattern.parent.glob(glob):
            leftover.unlink(missing_ok=True)


def _write_labels_last(segmenter, result, paths: Dict[str, Path], image, options: dict,
                       scan_outputs=None) -> None:
    """Write the optional outputs (and the scan's record and picture), then the label map
    under a hidden temporary name renamed into place: a label map on the disk means every
    output of the scan is complete."""
    final = paths["labels"]
    temporary = _partial_name(final, image, secrets.token_hex(4))
    try:
        write_segmentation(result, dict(paths, labels=temporary), segmenter.atlas_image,
                           segmenter.atlas_volume.affine, **options)
        if scan_outputs is not None and scan_outputs.wanted:
            scan_outputs.write(image, paths, result)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def segment_and_write(segmenter, image, paths: Dict[str, Path], options: dict,
                      scan_outputs=None) -> str:
    """Segment one scan, write its outputs labels last; returns its :func:`describe_result`
    line. ``options``: the ``save_*`` flags of :func:`write_segmentation`."""
    result = segmenter.segment(image)
    _write_labels_last(segmenter, result, paths, image, options, scan_outputs)
    return describe_result(image, paths["labels"], result)


def failure_reason(error: BaseException) -> str:
    """How a failed scan is reported: a VolumeError's message names the file already."""
    return str(error) if isinstance(error, VolumeError) else f"{type(error).__name__}: {error}"


def describe_result(image, labels_path, result) -> str:
    """The line printed per segmented scan: where it went and each stage's seconds."""
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    total = sum(result.seconds.values())
    refined = result.refinement
    folding = ("" if refined is None else
               f"; refined field folds {100 * refined.folding_fraction:.3f}%")
    if refined is not None and refined.inverse_consistency_mm is not None:
        folding += f", forward-backward round trip {refined.inverse_consistency_mm:.2f} mm"
    return f"{image} -> {labels_path} ({timing}; total {total:.2f}s{folding})"
