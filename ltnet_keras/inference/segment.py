"""Segmentation of new scans: the atlas labels warped by the forward field (Eq. 2).

The network predicts the forward field on the network grid; it is brought to the scan's own
grid (up-sampled, in original voxels) and the full-resolution atlas label map is warped there,
so the output has the scan's shape, affine and header and holds the atlas' label ids.

With ``align="affine"`` the scan is first registered affinely to the atlas and resampled onto
the atlas grid (:mod:`ltnet_keras.data.align`); G_F runs there, and each voxel of the scan's own
grid looks up the atlas labels through the inverse affine and the forward field, so the labels
are resampled once, straight from the atlas onto the scan's grid.
"""
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from ltnet_keras.data.align import (Alignment, AlignmentCache, RegistrationGrids,
                                    RegistrationSettings, check_align_mode, load_ants,
                                    register_affine)
from ltnet_keras.config import BACKWARD_WEIGHTS, FORWARD_WEIGHTS, load_config
from ltnet_keras.data.alignment_check import AlignmentChecker
from ltnet_keras.data.atlas import recorded_atlas_files
from ltnet_keras.data.dataset import PreparedSubject, prepare_volumes
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.data.grids import check_field_of_view
from ltnet_keras.data.io import Volume, load_subject, subject_id
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.data.preprocess import GridSpec, brain_bbox, normalise_intensity
from ltnet_keras.data.skull import BrainExtraction, BrainFinder, default_brain_finder
from ltnet_keras.inference.atlas_space import (label_region, nonzero_box, normalised_crop,
                                               to_atlas_space_box)
from ltnet_keras.inference.outputs import output_paths, write_segmentation
from ltnet_keras.inference.refine import (RefineResult, RefineSettings, crop_image,
                                          refine_field)
from ltnet_keras.inference.refine_cycle import BackwardStart
from ltnet_keras.inference.programs import file_digest, stored_program
from ltnet_keras.inference.transfer_programs import (TRANSFER_CHUNK, field_on_grid,
                                                     labels_on_grid, labels_through)
from ltnet_keras.inference.transfer import (_check_method, field_at_points,  # noqa: F401
                                            field_to_grid, sampling_grid, warp_image,
                                            warp_label_map, warp_labels_tf)

@dataclass
class Segmentation:
    """One scan's result: ``labels`` on its own grid ``(X, Y, Z)`` with its affine and header.

    ``forward_field`` ``(x', y', z', 3)`` lives where G_F ran: the scan's own grid, or with an
    ``alignment`` the atlas grid, where ``aligned_image`` is the scan moved into atlas space.
    ``field_source``: its values, or a function giving them on first use (on a 256^3 grid the
    field is 200 MB and ~0.6 s, wanted only by ``--save-field``, the warped atlas and QC).
    """
    subject: str
    labels: np.ndarray
    affine: np.ndarray
    header: object
    field_source: Union[np.ndarray, Callable[[], np.ndarray]]
    atlas_offset: np.ndarray
    seconds: Dict[str, float] = field(default_factory=dict)
    alignment: Optional[Alignment] = None
    aligned_image: Optional[np.ndarray] = None
    #: The field the labels were warped with, ``(x, y, z, 3)`` in voxels of its grid: G_F's
    #: on the network grid, or with refinement the refined one on refinement's finest grid.
    network_field: Optional[np.ndarray] = None
    #: With refinement: how it went (:class:`~ltnet_keras.inference.refine.RefineResult`).
    refinement: Optional[RefineResult] = None
    #: For a whole-head scan: its brain mask and how it was found (``data.skull``).
    brain: Optional[BrainExtraction] = None
    #: Quality signals (:func:`ltnet_keras.inference.qc.qc_signals`), when measured.
    signals: Dict[str, float] = field(default_factory=dict)

    @property
    def forward_field(self) -> np.ndarray:
        if callable(self.field_source):
            self.field_source = np.asarray(self.field_source())
        return self.field_source

    @property
    def sampling_positions(self) -> np.ndarray:
        """``(x', y', z', 3)``: where each voxel of the forward field's grid samples the atlas
        (atlas voxels)."""
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)
                                      for n in self.forward_field.shape[:3]], indexing="ij"), -1)
        return grid + self.forward_field + self.atlas_offset


class KeptScans:
    """Values kept by path, each taken once, up to ``max_bytes`` in all (beyond: not kept)."""

    def __init__(self, max_bytes: int = 1 << 29):
        self.max_bytes, self.used, self.kept = max_bytes, 0, {}

    def keep(self, path, value, nbytes: int) -> None:
        if str(path) not in self.kept and self.used + nbytes <= self.max_bytes:
            self.kept[str(path)] = (value, nbytes)
            self.used += nbytes

    def take(self, path):
        value, nbytes = self.kept.pop(str(path), (None, 0))
        self.used -= nbytes
        return value


class Segmenter:
    """Loads a run's G_F and atlas once, then segments scans one after another.

    ``align``: ``"none"`` for scans already in the atlas' space, ``"affine"`` to register each
    scan to the atlas first (default: the run's ``data.align``). ``alignment_cache``: a folder
    where alignments are kept and reused (the run directory's ``aligned/`` during experiments).
    """

    def __init__(self, run_dir, atlas_image=None, atlas_labels=None,
                 label_interp: Optional[str] = None, jit_compile: bool = False,
                 align: Optional[str] = None,
                 registration: Optional[RegistrationSettings] = None, alignment_cache=None,
                 refine: Optional[RefineSettings] = None, alignment_check: str = "refuse",
                 brain_finder: Optional[BrainFinder] = None, measure_qc: bool = False):
        import tensorflow as tf

        run_dir = Path(run_dir)
        for needed in ("config.yaml", "atlas.json", FORWARD_WEIGHTS):
            if not (run_dir / needed).exists():
                raise VolumeError(run_dir / needed, "missing: not a finished training run")
        self.config = load_config(run_dir / "config.yaml")
        record = json.loads((run_dir / "atlas.json").read_text())
        self.label_interp = label_interp or self.config.segment.label_interp
        _check_method(self.label_interp)
        self.align = check_align_mode(align or self.config.data.align)
        self.registration = registration or RegistrationSettings()
        self.alignment_cache = None if alignment_cache is None else AlignmentCache(
            alignment_cache, self.registration)
        self.checker = AlignmentChecker.for_run(run_dir, alignment_check)
        if self.align == "affine":
            load_ants()  # now, not inside the first case's timing
        self.table = LabelTable.from_ids(record["label_ids"])
        data = self.config.data
        # The protocol's names and merged structures, when the run's label table is at hand.
        tsv = data.resolved_labels_tsv()
        self.protocol = LabelTable.from_tsv(tsv) if tsv.is_file() else self.table
        self.measure_qc = measure_qc
        if not (atlas_image and atlas_labels):
            recorded_image, recorded_labels = recorded_atlas_files(record, data)
            atlas_image = atlas_image or recorded_image
            atlas_labels = atlas_labels or recorded_labels
        atlas_volume, atlas_label_volume = load_subject(atlas_image, atlas_labels, self.table)
        self.atlas_volume = atlas_volume
        self.atlas: PreparedSubject = prepare_volumes(
            atlas_volume, atlas_label_volume, data.crop_shape, data.factor, record["atlas"])
        self.atlas_image = atlas_volume.array
        self.atlas_labels = atlas_label_volume.array
        # As in training (data.crop): every scan on the atlas' grid gets the atlas' window.
        self._crop_window = self.atlas.grid if data.resolved_crop() == "atlas" else None
        first, stop = brain_bbox(self.atlas_labels > 0)
        self._labelled_box = (np.array(first, np.float64), np.array(stop, np.float64) - 1.0)
        self.refine = refine
        #: What checking a batch read (:meth:`prepare`), kept for segmenting it.
        self.checked_scans = KeptScans()
        # Whole-head scans are detected and their brain extracted (templates: the data root's
        # FreeSurfer subjects, or a `freesurfer` collection beside it) unless told otherwise.
        self.brain_finder = brain_finder or default_brain_finder(data.resolved_root())
        self._weights_file, self._generator = run_dir / FORWARD_WEIGHTS, None
        # LT-Net at test time: G_B (loaded on first use) starts the backward field.
        self.backward_start = BackwardStart(run_dir / BACKWARD_WEIGHTS, self.atlas.image,
                                            self.config.network)
        atlas_input = tf.constant(self.atlas.image[None, ..., None])

        @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
        def predict_field(atlas, target):
            return self.generator([atlas, target], training=False)[0]

        # Traced once per grid shape and kept with G_F's weights as constants: a later process
        # neither imports voxelmorph nor builds G_F (0.45 s of a one-scan command).
        field_program = stored_program(predict_field, freeze=True, salt=(
            f"{file_digest(self._weights_file)}|{self.config.network}|{jit_compile}"))
        self._predict_field = lambda target: field_program(atlas_input, target)
        self._atlas_labels_tensor = tf.constant(self.atlas_labels.astype(np.int32))

    @property
    def generator(self):
        """G_F: voxelmorph's U-Net with the run's weights, built on first use."""
        if self._generator is None:
            import tensorflow as tf

            from ltnet_keras.models.generators import make_generator
            with tf.init_scope():   # its variables live outside any trace that asks for it
                generator = make_generator(self.atlas.image.shape, self.config.network,
                                           "forward_generator")
                generator.load_weights(str(self._weights_file))
            self._generator = generator
        return self._generator

    def forward_field(self, target: PreparedSubject):
        """``(x, y, z, 3)`` forward field (a tensor) on the network grid for a prepared scan."""
        return self._predict_field(target.image[None, ..., None])

    def prepare(self, image_path, keep: bool = False) -> PreparedSubject:
        """Read a scan, check that this run can segment it and put it on the network grid;
        ``keep``: what was read stays for :meth:`segment` (a batch's check pass).

        Refuses (VolumeError naming the file) what ``data.io`` refuses, a constant image, and
        a scan too small for the atlas' field of view (:func:`check_field_of_view`); aligning,
        one that resembles the atlas too little once aligned (:meth:`alignment`).
        """
        image, brain = self.brain_finder.read(image_path)
        prepared = self._prepare_loaded(image, image_path)
        if self.align == "affine":
            self.alignment(image)   # checked before any output is written, and kept
        if keep:
            self.checked_scans.keep(image_path, (image, brain, prepared), image.array.nbytes)
        return prepared

    def read_scan(self, image_path) -> Tuple[Volume, Optional[BrainExtraction], PreparedSubject]:
        """A scan, its brain and its network input: as :meth:`prepare` made them (a batch's
        check), or from the file."""
        kept = self.checked_scans.take(image_path)
        if kept is not None:
            return kept
        image, brain = self.brain_finder.read(image_path)
        return image, brain, None

    def _prepare_loaded(self, image: Volume, image_path) -> PreparedSubject:
        check_field_of_view(image, self.atlas_volume)
        data = self.config.data
        return prepare_volumes(image, None, data.crop_shape, data.factor,
                               subject_id(image_path), self._crop_window)

    def field_for(self, target: PreparedSubject, image: Optional[np.ndarray], seconds: dict,
                  target_crop: Optional[np.ndarray] = None):
        """The forward field labels are warped with, and its grid's factor on the crop: G_F's
        on the network grid, refined on ``target_crop`` (the scan's normalised crop; made from
        ``image``, the scan at full resolution on the grid ``target.grid`` maps back to, when
        not given) when this segmenter refines. Adds ``network`` (and ``refine``) to
        ``seconds``; returns the field, its factor and the :class:`RefineResult` (or None)."""
        clock = time.perf_counter()
        field_network = np.asarray(self.forward_field(target))
        add_seconds(seconds, "network", time.perf_counter() - clock)
        if self.refine is None:
            return field_network, self.config.data.factor, None
        if target_crop is None:
            target_crop = crop_image(image, target.grid)
        result = self.refine_crop(field_network, target_crop)
        add_seconds(seconds, "refine", result.seconds)
        return result.field, result.factor, result

    @functools.cached_property
    def atlas_crop(self) -> np.ndarray:
        """The atlas as refinement compares it with each scan: its normalised 1 mm crop."""
        return crop_image(self.atlas_image, self.atlas.grid)

    def refine_crop(self, field_network, target_crop, settings=None) -> RefineResult:
        """:func:`refine_field` of G_F's field on a scan's normalised crop with this atlas and
        ``settings`` (default ``self.refine``): G_B's start and the atlas' labels for ltnet."""
        settings = settings or self.refine
        ltnet = settings.objective == "ltnet"
        backward = (self.backward_start(field_network)
                    if ltnet and settings.start == "network" else None)
        labels = self.atlas.grid.crop(self.atlas_labels) if ltnet else None
        return refine_field(self.atlas_crop, target_crop, field_network, settings, backward,
                            labels)

    def segment(self, image_path) -> Segmentation:
        """Label map of one scan on its own grid (Eq. 2), aligned first if ``self.align``;
        with ``measure_qc`` its quality signals too."""
        # ``on_field_grid``: the scan where the field was found (its own grid, or atlas space).
        if self.align == "affine":
            result, on_field_grid = self._segment_aligned(image_path)
        else:
            result, on_field_grid = self._segment_in_place(image_path)
        if result.brain is not None:
            result.seconds.update(result.brain.seconds)
        if self.measure_qc:
            self.measure_signals(result, on_field_grid)
        return result

    def measure_signals(self, result: Segmentation, on_field_grid: np.ndarray) -> None:
        """Adds the quality signals of ``result`` (this atlas') and ``qc`` to its seconds."""
        from ltnet_keras.inference.qc import qc_signals
        from ltnet_keras.inference.refine import folding_fraction
        clock = time.perf_counter()
        folding = (result.refinement.folding_fraction if result.refinement is not None
                   else folding_fraction(result.network_field))
        result.signals.update(qc_signals(
            self.atlas_image, self.atlas_labels, on_field_grid, result.sampling_positions,
            self.protocol, 100.0 * folding,
            None if result.alignment is None else result.alignment.similarity))
        if result.refinement is not None and result.refinement.inverse_consistency_mm:
            # LT-Net's objective: how far G_B's refined field is from inverting G_F's.
            result.signals["inverse_consistency_mm"] = result.refinement.inverse_consistency_mm
        result.seconds["qc"] = time.perf_counter() - clock

    def _segment_in_place(self, image_path) -> Tuple[Segmentation, np.ndarray]:
        """The scan is taken to be in the atlas' space already; the field is in its voxels.
        Returns the segmentation and the scan (its brain, for a whole head) as segmented."""
        seconds = {}
        clock = time.perf_counter()
        image, brain, target = self.read_scan(image_path)
        target = target or self._prepare_loaded(image, image_path)
        seconds["read_prepare"] = time.perf_counter() - clock

        field, factor, refined = self.field_for(target, image.array, seconds)
        clock = time.perf_counter()
        offset = self.crop_offset(target.grid)
        labels, on_grid = self.labels_in_place(target.grid, field, factor)
        labels, forward_field = labels.numpy(), on_grid.numpy   # the field read if wanted
        seconds["warp"] = time.perf_counter() - clock
        return Segmentation(target.subject, labels.astype(self.atlas_labels.dtype),
                            target.affine, target.header, forward_field, offset, seconds,
                            network_field=field, refinement=refined, brain=brain), image.array

    def crop_offset(self, grid: GridSpec) -> np.ndarray:
        """Original voxels between the atlas' crop and a scan's crop ``grid`` (float32): both
        are centred on their own brain, so network voxel p is original voxel start + factor *
        p (+ block centre) in each, and the two differ by this constant."""
        return (np.array(self.atlas.grid.crop_start)
                - np.array(grid.crop_start)).astype(np.float32)

    def labels_in_place(self, grid: GridSpec, field, factor: int):
        """Atlas labels on the own grid of a scan in the atlas' space, whose crop is ``grid``,
        through ``field`` (``(x, y, z, 3)`` on the crop down-sampled by ``factor``, in its
        voxels): ``(labels, the field on the scan's grid)``, tensors."""
        return labels_on_grid(self._atlas_labels_tensor, field, tuple(grid.original_shape),
                              np.array(grid.crop_start, np.int32), self.crop_offset(grid),
                              factor, self.label_interp)

    def alignment(self, scan) -> Alignment:
        """The affine registration of a loaded scan to the atlas (from the cache if kept),
        checked once per file: a poor match is refused or reported (``alignment_check``)."""
        cache, atlas = self.alignment_cache, self.atlas_volume
        return self.checker.checked(scan.path, lambda: cache.alignment(scan, atlas) if cache
                                    else register_affine(scan, atlas, self.registration,
                                                         atlas_grids=self._atlas_grids))

    @functools.cached_property
    def _atlas_grids(self) -> RegistrationGrids:
        return RegistrationGrids.of(self.atlas_volume, self.registration.spacing)

    def _segment_aligned(self, image_path) -> Tuple[Segmentation, np.ndarray]:
        """Register the scan to the atlas, run G_F in atlas space, and pull the atlas labels
        onto the scan's own grid through the inverse affine in one resampling. Returns the
        segmentation and the scan in atlas space."""
        seconds = {}
        clock = time.perf_counter()
        scan, brain, _ = self.read_scan(image_path)
        check_field_of_view(scan, self.atlas_volume)
        scan_box = nonzero_box(scan.array)
        seconds["read"] = time.perf_counter() - clock
        alignment = self.alignment(scan)
        seconds.update(alignment.seconds)
        result, _, _ = self.segment_through(scan, alignment, scan_box, image_path, seconds)
        result.brain = brain
        return result, result.aligned_image

    def segment_through(self, scan: Volume, alignment: Alignment, scan_box, image_path,
                        seconds: Dict[str, float]) -> Tuple[Segmentation, np.ndarray, int]:
        """A loaded scan's labels through ``alignment``, the scan resampled into atlas space
        only where its non-zero ``scan_box`` lands (:mod:`.atlas_space`). Adds to ``seconds``;
        returns the segmentation, the normalised crop and the factor of the field's grid."""
        clock = time.perf_counter()
        aligned, box = to_atlas_space_box(scan, alignment, scan_box, with_box=True)
        data = self.config.data
        grid = self._crop_window
        if grid is None:   # a crop centred on the scan's brain: as prepare_volumes finds it
            grid = GridSpec.centred_on(normalise_intensity(aligned.array, source=scan.path),
                                       data.crop_shape, data.factor)
        target_crop = normalised_crop(aligned.array, box, grid, source=scan.path)
        target = PreparedSubject(subject_id(image_path), grid.downsample(target_crop, "image"),
                                 None, grid, aligned.affine, str(image_path))
        add_seconds(seconds, "to_atlas_space", time.perf_counter() - clock)
        field, factor, refined = self.field_for(target, None, seconds, target_crop)
        clock = time.perf_counter()
        offset = self.crop_offset(grid)
        region = label_region(field, factor, grid.crop_start, offset, self._labelled_box,
                              self.atlas_labels.shape)
        labels = self._labels_through(alignment, field, grid.crop_start, offset, factor, region)
        forward_field = functools.partial(field_on_grid, field, tuple(grid.original_shape),
                                          np.array(grid.crop_start, np.int32), factor)
        add_seconds(seconds, "labels_to_scan_grid", time.perf_counter() - clock)
        return Segmentation(target.subject, labels.astype(self.atlas_labels.dtype),
                            scan.affine, scan.header, forward_field, offset, seconds,
                            alignment, aligned.array, network_field=field,
                            refinement=refined), target_crop, factor

    def _labels_through(self, alignment: Alignment, field_network, crop_start,
                        offset, factor, region=None) -> np.ndarray:
        """Atlas labels on the scan's grid: every scan voxel that can see the atlas grid looks
        the labels up at inverse-affine + forward-field; the rest is background."""
        # Only atlas points that the field can carry onto a labelled voxel can get a label: the
        # atlas' labelled box widened by the largest displacement (and the offset between the
        # crops), or a given ``region``. The scan voxels mapping outside it are background.
        reach = (np.abs(np.asarray(field_network)).max(axis=(0, 1, 2)) * factor
                 + np.abs(offset) + 2.0)
        low, high = self._labelled_box
        grid_low, grid_high = np.full(3, -0.5), np.asarray(self.atlas_labels.shape) - 0.5
        region = region or (np.maximum(low - reach, grid_low), np.minimum(high + reach, grid_high))
        start, stop = alignment.scan_box(region)
        labels = np.zeros(alignment.scan_shape, dtype=self.atlas_labels.dtype)
        box_shape = stop - start
        total = int(np.prod(box_shape))
        if total == 0:
            return labels
        scan_to_atlas = alignment.scan_voxel_to_atlas_voxel.astype(np.float32)
        box = np.empty(total, dtype=np.int32)
        for first in range(0, total, TRANSFER_CHUNK):
            chunk = labels_through(
                self._atlas_labels_tensor, field_network, scan_to_atlas, start.astype(np.int32),
                box_shape.astype(np.int32), np.int32(first), np.array(crop_start, np.int32),
                offset, factor, self.label_interp).numpy()
            box[first:first + TRANSFER_CHUNK] = chunk[:total - first]
        labels[tuple(slice(a, b) for a, b in zip(start, stop))] = box.reshape(box_shape)
        return labels

    def segment_to_files(self, image_path, out_dir, save_warped_atlas=False,
                         save_field=False, save_aligned=False,
                         paths: Optional[Dict[str, Path]] = None,
                         save_brain_mask=False) -> Segmentation:
        """Segment one scan; write ``out_dir/<id><ext>`` (label ids on the scan's grid with its
        header, in the scan's own format: :func:`output_paths`) and, if asked,
        ``out_dir/warped_atlas/``, ``out_dir/forward_field/`` (3 components, in voxels of the
        grid G_F ran on: the scan's, or the atlas' when aligned) and ``out_dir/aligned/`` (the
        scan in atlas space and its alignment as JSON). ``paths``: where to write instead (from
        :func:`plan_output_paths`); existing files are replaced."""
        result = self.segment(image_path)
        paths = paths or output_paths(image_path, out_dir, result.subject)
        write_segmentation(result, paths, self.atlas_image, self.atlas_volume.affine,
                           save_warped_atlas, save_field, save_aligned, save_brain_mask)
        return result


def add_seconds(seconds: Dict[str, float], stage: str, value: float) -> None:
    """Add ``value`` to ``seconds[stage]`` (a stage timed once per atlas adds up)."""
    seconds[stage] = seconds.get(stage, 0.0) + value
