"""Several labelled atlases for one scan: each atlas' labels are warped onto the scan by G_F's
(optionally refined) forward field for that atlas, then fused per voxel by majority vote or
joint label fusion (:func:`ltnet_keras.inference.fusion.fuse_atlases`).

G_F takes the atlas as its moving input, so one trained run serves any atlas of the run's
protocol; the atlases are ranked per scan by how much their warped image looks like it.
"""
import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ltnet_keras.data.align import Alignment, AlignmentCache, register_affine
from ltnet_keras.data.atlas import _ncc
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.grids import check_field_of_view
from ltnet_keras.data.io import find_subjects, subject_id
from ltnet_keras.data.preprocess import normalise_intensity
from ltnet_keras.inference.atlas_space import compose, nonzero_box, ranking_similarity
from ltnet_keras.inference.fusion import (FUSIONS, JointFusionSettings, fuse_atlases,
                                          majority_vote)
from ltnet_keras.inference.outputs import output_paths, write_segmentation
from ltnet_keras.inference.qc import atlas_disagreement
from ltnet_keras.inference.segment import Segmentation, Segmenter, add_seconds, warp_image


def _check_fusion(fusion: str, atlases: int) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    if not atlases:
        raise ValueError("at least one atlas is needed")


def atlas_files(items: Sequence[str], data_root) -> List[Tuple[str, str]]:
    """``(image, labels)`` paths of each atlas a user names in one line: a subject id of the
    data root (``S13``: ``images/S13.*`` with ``labels/S13.*``) or ``IMAGE:LABELS``."""
    subjects = None
    pairs = []
    for item in items:
        if ":" in item:
            image, labels = item.split(":", 1)
            for path in (image, labels):
                if not Path(path).is_file():
                    raise VolumeError(path, f"atlas {item!r}: no such file")
            pairs.append((image, labels))
            continue
        if subjects is None:
            subjects = find_subjects(data_root) if Path(data_root).is_dir() else {}
        found = subjects.get(item)
        if found is None or found.label is None:
            raise ValueError(f"atlas {item!r}: no subject of that id with a label map under "
                             f"{data_root}; give a subject id of the data root or IMAGE:LABELS")
        pairs.append((str(found.image), str(found.label)))
    if len(pairs) != len(set(pairs)):
        raise ValueError(f"atlases {list(items)}: the same atlas is given twice")
    return pairs


class MultiAtlasSegmenter:
    """One :class:`Segmenter` per atlas (same run, same options), fused by ``fusion``.

    ``fusion="jlf"`` needs scans in the atlases' space (``align="none"``): with an affine
    alignment each atlas' warped image lives on its own atlas grid, not on the scan's.
    """

    def __init__(self, run_dir, atlases: Sequence[Tuple[str, str]], fusion: str = "majority",
                 jlf: Optional[JointFusionSettings] = None, fast: bool = True,
                 compose_alignments: bool = True, **segmenter_options):
        _check_fusion(fusion, len(atlases))   # before any atlas is loaded
        # QC signals are the first atlas' (plus the atlases' disagreement): one measurement.
        measure_qc = segmenter_options.pop("measure_qc", False)
        segmenters = []
        for k, (image, labels) in enumerate(atlases):
            segmenters.append(Segmenter(run_dir, atlas_image=image, atlas_labels=labels,
                                        measure_qc=measure_qc and k == 0, **segmenter_options))
            # One reader for all: a whole-head scan's brain is extracted once, not per atlas.
            segmenter_options["brain_finder"] = segmenters[0].brain_finder
        self._setup(segmenters, fusion, jlf, fast, compose_alignments)

    @classmethod
    def from_segmenters(cls, segmenters: Sequence[Segmenter], fusion: str = "majority",
                        jlf: Optional[JointFusionSettings] = None, fast: bool = True,
                        compose_alignments: bool = True) -> "MultiAtlasSegmenter":
        """Fuse segmenters already made (of one run, sharing one ``brain_finder``), e.g. one
        per atlas kept across scans whose atlas lists differ."""
        _check_fusion(fusion, len(segmenters))
        self = cls.__new__(cls)
        self._setup(list(segmenters), fusion, jlf, fast, compose_alignments)
        return self

    def _setup(self, segmenters, fusion, jlf, fast, compose_alignments):
        self.segmenters = segmenters
        if fusion == "jlf" and self.segmenters[0].align != "none":
            raise ValueError("joint label fusion needs scans in the atlas' space (--align "
                             "none); with --align affine use --fusion majority")
        self.fusion, self.jlf = fusion, jlf or JointFusionSettings()
        first = self.segmenters[0]
        self.atlas_image, self.atlas_volume = first.atlas_image, first.atlas_volume
        # The fast path (issue 28): one registration per scan, to the first atlas, composed
        # with the atlases' registrations to it (made here, once); see ``atlas_space``.
        # ``compose_alignments=False``: each atlas registered to the scan (for comparisons).
        self.fast = bool(fast) and first.align == "affine" and fusion == "majority"
        self.compose_alignments = compose_alignments
        #: The atlases' indices in the order of the last scan's vote (most similar first).
        self.last_order: List[int] = []
        #: With ``keep_maps`` (for comparisons): the last scan's label map per atlas.
        self.keep_maps, self.last_maps = False, []
        self._first_to_atlas: List[Optional[Alignment]] = [None] * len(self.segmenters)
        if self.fast and compose_alignments:
            for k, segmenter in enumerate(self.segmenters[1:], 1):
                self._first_to_atlas[k] = self._atlas_alignment(segmenter)

    def _atlas_alignment(self, segmenter: Segmenter) -> Alignment:
        """The first atlas registered to ``segmenter``'s atlas (kept in the alignment cache's
        ``atlases/<atlas id>/`` when the segmenters have a cache)."""
        first = self.segmenters[0]
        cache = first.alignment_cache
        if cache is None:
            return register_affine(first.atlas_volume, segmenter.atlas_volume,
                                   first.registration)
        folder = cache.folder / "atlases" / subject_id(segmenter.atlas_volume.path)
        return AlignmentCache(folder, cache.settings).alignment(first.atlas_volume,
                                                                segmenter.atlas_volume)

    def prepare(self, image_path, keep: bool = False):
        return self.segmenters[0].prepare(image_path, keep)

    def segment(self, image_path) -> Segmentation:
        """Every atlas' label map of the scan, fused; seconds are summed over the atlases,
        plus ``fusion``. The other outputs (field, warped atlas) are the first atlas'."""
        if self.fast:
            return self._segment_fast(image_path)
        results = [segmenter.segment(image_path) for segmenter in self.segmenters]
        clock = time.perf_counter()
        maps = [result.labels for result in results]
        warped = [normalise_intensity(warp_image(s.atlas_image, r.sampling_positions))
                  for s, r in zip(self.segmenters, results)]
        if results[0].alignment is None:
            scan = self.segmenters[0].brain_finder.read(image_path)[0]
            fused = fuse_atlases(maps, warped, normalise_intensity(scan.array), self.fusion,
                                 scan.affine, self.jlf)
        else:
            # Each atlas saw the scan in its own space: rank them there, then vote.
            similarity = [_ncc(np.asarray(w, np.float64), np.asarray(r.aligned_image, np.float64))
                          for w, r in zip(warped, results)]
            order = sorted(range(len(maps)), key=lambda i: -np.nan_to_num(similarity[i], nan=-2))
            self.last_order = order
            self.last_maps = maps if self.keep_maps else []
            fused = majority_vote([maps[i] for i in order])
        seconds: Dict[str, float] = {}
        for result in results:
            for stage, value in result.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        seconds["fusion"] = time.perf_counter() - clock
        signals = dict(results[0].signals)
        if signals:   # the first atlas' signals, and how much the atlases disagree
            signals["atlas_disagreement"] = atlas_disagreement(maps)
        return dataclasses.replace(results[0], labels=fused.astype(results[0].labels.dtype),
                                   seconds=seconds, signals=signals)

    def _segment_fast(self, image_path) -> Segmentation:
        """:meth:`segment` with one registration (to the first atlas) per scan, the scan
        resampled into each atlas' space only where it is non-zero and read once, and the
        atlases ranked on the field's grid (:mod:`ltnet_keras.inference.atlas_space`)."""
        seconds: Dict[str, float] = {}
        first = self.segmenters[0]
        clock = time.perf_counter()
        scan, brain, _ = first.read_scan(image_path)
        for segmenter in self.segmenters:
            check_field_of_view(scan, segmenter.atlas_volume)
        scan_box = nonzero_box(scan.array)
        seconds["read"] = time.perf_counter() - clock
        alignment = first.alignment(scan)
        seconds.update(alignment.seconds)
        maps, similarity, result = [], [], None
        for k, segmenter in enumerate(self.segmenters):
            clock = time.perf_counter()
            if k == 0:
                aligned = alignment
            elif self.compose_alignments:
                aligned = compose(alignment, self._first_to_atlas[k])
                add_seconds(seconds, "atlas_alignment", time.perf_counter() - clock)
            else:
                aligned = segmenter.alignment(scan)
                for stage, value in aligned.seconds.items():
                    add_seconds(seconds, stage, value)
            one, target_crop, factor = segmenter.segment_through(scan, aligned, scan_box,
                                                                 image_path, seconds)
            clock = time.perf_counter()
            similarity.append(ranking_similarity(segmenter.atlas_crop, target_crop,
                                                 one.network_field, factor))
            add_seconds(seconds, "rank", time.perf_counter() - clock)
            maps.append(one.labels)
            result = result or one
        clock = time.perf_counter()
        order = sorted(range(len(maps)), key=lambda i: -np.nan_to_num(similarity[i], nan=-2))
        self.last_order = order
        if self.keep_maps:
            self.last_maps = maps
        fused = majority_vote([maps[i] for i in order])
        seconds["fusion"] = time.perf_counter() - clock
        result.seconds = seconds
        result.brain = brain
        if brain is not None:
            result.seconds.update(brain.seconds)
        if first.measure_qc:
            first.measure_signals(result, result.aligned_image)
            result.signals["atlas_disagreement"] = atlas_disagreement(maps)
        result.labels = fused.astype(maps[0].dtype)
        return result

    def segment_to_files(self, image_path, out_dir, save_warped_atlas=False, save_field=False,
                         save_aligned=False, paths: Optional[Dict[str, Path]] = None,
                         save_brain_mask=False) -> Segmentation:
        """As :meth:`Segmenter.segment_to_files`; the optional outputs are the first atlas'."""
        result = self.segment(image_path)
        paths = paths or output_paths(image_path, out_dir, result.subject)
        write_segmentation(result, paths, self.atlas_image, self.atlas_volume.affine,
                           save_warped_atlas, save_field, save_aligned, save_brain_mask)
        return result
