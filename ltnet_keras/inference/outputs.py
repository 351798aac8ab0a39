"""Where segmentation outputs go: one base name per scan (distinct over a batch or a cohort),
the label map in the input's own format, and the optional outputs in sub-folders."""
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.io import output_suffix, save_volume, subject_id
from ltnet_keras.records import atomic_write_text

# Sub-folders of the output folder for the optional outputs of segment_to_files.
WARPED_ATLAS_DIR = "warped_atlas"
FORWARD_FIELD_DIR = "forward_field"
ALIGNED_DIR = "aligned"
BRAIN_MASK_DIR = "brain_mask"


def _distinct_names(images: Sequence[Path]) -> List[str]:
    """Output names (without suffix) for ``images``: the subject id, prefixed with as many
    parent folder names as it takes to tell apart scans whose ids repeat
    (``a/brainmask.mgz``, ``b/brainmask.mgz`` -> ``a_brainmask``, ``b_brainmask``)."""
    folders = [path.relative_to(path.anchor).parent.parts for path in images]
    names = [subject_id(path) for path in images]
    for depth in range(1, max(len(f) for f in folders) + 1):
        repeated = {name for name, count in Counter(names).items() if count > 1}
        if not repeated:
            break
        names = [("_".join(f[-depth:] + (subject_id(path),)) if name in repeated else name)
                 for name, f, path in zip(names, folders, images)]
    return names


def output_paths(image_path, out_dir, name: str) -> Dict[str, Path]:
    """Where :meth:`Segmenter.segment_to_files` writes the results for ``image_path``, every
    volume in the input's format (``.mgz`` in, ``.mgz`` out; see :func:`io.output_suffix`).
    ``name``: the base name, the subject id or a name from :func:`plan_output_paths`."""
    out_dir = Path(out_dir)
    ext = output_suffix(image_path)
    return {"labels": out_dir / f"{name}{ext}",
            "warped_atlas": out_dir / WARPED_ATLAS_DIR / f"{name}{ext}",
            "forward_field": out_dir / FORWARD_FIELD_DIR / f"{name}{ext}",
            "aligned": out_dir / ALIGNED_DIR / f"{name}{ext}",
            "alignment": out_dir / ALIGNED_DIR / f"{name}.json",
            "brain_mask": out_dir / BRAIN_MASK_DIR / f"{name}{ext}"}


def plan_output_paths(images, out_dir, overwrite=False,
                      extras: Sequence[str] = ()) -> List[Dict[str, Path]]:
    """:func:`output_paths` of each scan for ``ltnet segment``, with distinct names.

    Refuses (VolumeError), before anything is written: a scan given twice, two scans that
    would get the same output, an output that would replace one of the scans, and unless
    ``overwrite`` an output that exists already, the label maps' and those of ``extras`` (the
    other keys of :func:`output_paths` that will be written, e.g. ``"warped_atlas"``).
    """
    # Absolute, not resolved: a symlinked scan keeps its own folder names.
    images = [Path(os.path.abspath(path)) for path in images]
    given_twice = [path for path, count in Counter(images).items() if count > 1]
    if given_twice:
        raise VolumeError(given_twice[0], "this scan is given more than once")
    plans = [output_paths(image, out_dir, name)
             for name, image in zip(_distinct_names(images), images)]
    outputs = [plan["labels"] for plan in plans]
    for output, count in Counter(outputs).items():
        if count > 1:
            clash = [str(image) for image, o in zip(images, outputs) if o == output]
            raise VolumeError(output, f"scans {clash} would all be written here; rename them")
    written = outputs + [plan[key] for key in extras for plan in plans]
    replaced = [path for path in written if Path(os.path.abspath(path)) in set(images)]
    if replaced:
        raise VolumeError(replaced[0], "the output would replace this input scan; choose "
                                       "another output folder")
    existing = [str(path) for path in written if path.exists()]
    if existing and not overwrite:
        raise VolumeError(existing[0], f"output exists already ({len(existing)} of the outputs "
                                       "do); pass --overwrite to replace them")
    return plans


def write_segmentation(result, paths: Dict[str, Path], atlas_image, atlas_affine,
                       save_warped_atlas=False, save_field=False, save_aligned=False,
                       save_brain_mask=False) -> None:
    """Write a :class:`~ltnet_keras.inference.segment.Segmentation`'s label map and, if asked,
    the warped atlas, the forward field, the aligned scan (see
    :meth:`Segmenter.segment_to_files`) and, for a whole-head scan, its brain mask (uint8, the
    scan's grid); adds ``write`` to its seconds."""
    from ltnet_keras.inference.transfer import warp_image
    clock = time.perf_counter()
    save_volume(result.labels, paths["labels"], result.affine, result.header)
    # With an alignment, the field and the warped atlas live on the atlas grid.
    field_affine = result.affine if result.alignment is None else atlas_affine
    if save_warped_atlas:
        save_volume(warp_image(atlas_image, result.sampling_positions), paths["warped_atlas"],
                    field_affine)
    if save_field:
        save_volume(result.forward_field, paths["forward_field"], field_affine)
    if save_brain_mask and result.brain is not None:
        save_volume(result.brain.mask.astype(np.uint8), paths["brain_mask"], result.affine,
                    result.header)
    if save_aligned and result.alignment is not None:
        save_volume(result.aligned_image, paths["aligned"], atlas_affine)
        atomic_write_text(paths["alignment"], json.dumps(result.alignment.to_dict(), indent=2))
    result.seconds["write"] = time.perf_counter() - clock
