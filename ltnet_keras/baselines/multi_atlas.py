"""Multi-atlas segmentation, the classical baseline of the paper's Table 3 (Sec. 6.4).

Each of k labelled training scans (the atlases) is registered to a target scan with ANTs SyN
(Avants et al., Symmetric diffeomorphic image registration with cross-correlation, Medical
Image Analysis 12(1), 2008), its labels are warped onto the target's own full-resolution grid,
and the k warped label maps are fused per voxel, by joint label fusion (Wang et al., IEEE
TPAMI 2013; :func:`ltnet_keras.inference.fusion.joint_label_fusion`) or by majority vote
(:func:`ltnet_keras.inference.fusion.majority_vote`). Both fusions use the same registrations, and the
rows with 2, 3, 4, 5 atlases use prefixes of one ranked list (:func:`ranked_atlases`), so each
(atlas, target) pair is registered once (:class:`RegistrationCache`).

:func:`learned_multi_atlas` does the same with a trained LT-Net forward generator G_F as the
registration instead of SyN (the table's extra rows).

Every row records the seconds per target: the registrations of its k atlases (as measured
when they were computed) plus its fusion. A finished row (``<out>/<row>/scores.csv`` and
``row.json``) is read back instead of recomputed while its atlases, subjects and settings stay
the same.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.inference.fusion import (JointFusionSettings, fuse_atlases,  # noqa: F401
                                          joint_label_fusion, majority_vote, similarity_order)
from ltnet_keras.records import atomic_write_text, read_keyed_record, shown_path
from ltnet_keras.baselines.syn import (SMOKE_SYN, RegistrationCache, SynSettings,  # noqa: F401
                                       WarpedAtlas, register_atlas)

__all__ = ["SynSettings", "SMOKE_SYN", "WarpedAtlas", "register_atlas", "RegistrationCache",
           "ranked_atlases", "MultiAtlasRow", "FUSION_METHODS", "ants_multi_atlas",
           "LearnedFusion", "learned_multi_atlas", "similarity_order"]

FUSION_METHODS = ("jlf", "majority")


# ----------------------------------------------------------------------------- atlases

def ranked_atlases(data, first: Optional[str], k_max: int) -> List[str]:
    """Up to ``k_max`` atlases: ``first`` (the single-atlas method's atlas; None: the "auto"
    rule's pick), then the other training scans by decreasing similarity to the pool's
    average, the ranking :func:`ltnet_keras.data.atlas.select_atlas` picks the single atlas by.
    ``data`` is a :class:`ltnet_keras.config.DataConfig`. The rows with k atlases use the first
    k, so adding atlases never changes the ones already there."""
    from ltnet_keras.data.atlas import select_atlas
    from ltnet_keras.data.dataset import subject_files
    if int(k_max) < 1:
        raise ValueError(f"k_max must be at least 1, not {k_max}")
    files = subject_files(data, data.train_subjects)
    ranking = select_atlas({f.id: f.image for f in files}, measure="ncc", factor=2).ranking
    first = first or ranking[0]
    if first not in ranking:
        raise ValueError(f"atlas {first} is not one of the training scans {ranking}")
    order = [first] + [s for s in ranking if s != first]
    if k_max > len(order):
        print(f"only {len(order)} training scans can serve as atlases; k capped at {len(order)}")
    return order[:int(k_max)]


# ----------------------------------------------------------------------------- rows

@dataclass
class MultiAtlasRow:
    """One row of the table: ``scores`` per validation subject with the ``atlases`` it fused and
    the seconds each subject took (registrations of those atlases + fusion)."""
    name: str
    atlases: List[str]
    scores: List[evaluation.SubjectScores]
    seconds: Dict[str, float]
    extra: dict = field(default_factory=dict)

    @property
    def seconds_per_case(self) -> float:
        return float(np.mean(list(self.seconds.values()))) if self.seconds else float("nan")


def _read_row(row_dir: Path, key: dict) -> Optional[MultiAtlasRow]:
    record_path, scores_path = row_dir / "row.json", row_dir / "scores.csv"
    if not scores_path.exists():
        return None
    record = read_keyed_record(record_path, key)
    if record is None:
        return None
    scores = evaluation.read_scores_csv(scores_path)
    if [s.subject for s in scores] != list(key["subjects"]):
        return None
    return MultiAtlasRow(row_dir.name, list(record["atlases"]), scores,
                         {k: float(v) for k, v in record["seconds"].items()},
                         dict(record.get("extra", {})))


def _write_row(row_dir: Path, key: dict, row: MultiAtlasRow) -> None:
    evaluation.write_scores_csv(row.scores, row_dir / "scores.csv")
    # row.json last: it marks the row finished.
    atomic_write_text(row_dir / "row.json", json.dumps(
        {"key": key, "atlases": row.atlases, "seconds": row.seconds,
         "seconds_per_case": row.seconds_per_case, "extra": row.extra}, indent=2))


def _json(value):
    return json.loads(json.dumps(value, default=str))


def ants_row_name(method: str, k: int) -> str:
    return "ants_syn_k1" if k == 1 else f"ants_syn_{method}_k{k}"


def ants_multi_atlas(data, atlases: Sequence[str], ks: Sequence[int], out_dir,
                     syn: Optional[SynSettings] = None,
                     jlf: Optional[JointFusionSettings] = None,
                     methods: Sequence[str] = FUSION_METHODS,
                     save_segmentations: bool = True) -> Dict[str, MultiAtlasRow]:
    """ANTs SyN multi-atlas segmentation of ``data.val_subjects`` (a DataConfig), scored
    against their manual labels.

    For every k in ``ks`` the first k of ``atlases`` are fused by each of ``methods``
    ("jlf", "majority"); k = 1 is one row (``ants_syn_k1``: the registered atlas labels
    themselves). Majority-vote ties go to the atlas whose warped image correlates best with
    the target (:func:`similarity_order`). Registrations are kept in ``out_dir/registrations``
    (:class:`RegistrationCache`), rows in ``out_dir/<row>/`` (``scores.csv``, ``row.json``
    with the seconds per subject, and with ``save_segmentations`` the fused label maps in
    ``segmentations/``). Returns rows by name, k = 1 first, then each method's k in order.
    """
    from ltnet_keras.data.dataset import subject_files
    from ltnet_keras.data.io import load_image, load_label_map, save_volume
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.data.preprocess import normalise_intensity

    syn, jlf = syn or SynSettings(), jlf or JointFusionSettings()
    unknown = [m for m in methods if m not in FUSION_METHODS]
    if unknown:
        raise ValueError(f"unknown fusion methods {unknown}; valid: {', '.join(FUSION_METHODS)}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"numbers of atlases must be >= 1; got {ks}")
    if ks[-1] > len(atlases):
        raise ValueError(f"{ks[-1]} atlases asked for, only {len(atlases)} given: {atlases}")
    out_dir = Path(out_dir)
    subjects = list(data.val_subjects)
    overlap = sorted(set(subjects) & set(atlases[:ks[-1]]))
    if overlap:
        raise ValueError(f"validation subjects {overlap} are also atlases")
    table = LabelTable.from_tsv(data.resolved_labels_tsv())

    wanted = [(("single", 1) if k == 1 else (method, k)) for k in ks
              for method in (["single"] if k == 1 else methods)]
    keys = {ants_row_name(m, k): _json({
        "method": m, "atlases": list(atlases[:k]), "subjects": subjects,
        "data_root": data.root, "syn": syn.to_dict(),
        "jlf": jlf.to_dict() if m == "jlf" else None}) for m, k in wanted}
    rows = {name: _read_row(out_dir / name, key) for name, key in keys.items()}
    missing = [(m, k) for m, k in wanted if rows[ants_row_name(m, k)] is None]
    for name, row in rows.items():
        if row is not None:
            print(f"[multi-atlas] {name}: finished, reading {out_dir / name / 'scores.csv'}")
    if not missing:
        return rows

    k_needed = max(k for _, k in missing)
    cache = RegistrationCache(out_dir / "registrations", syn, table)
    atlas_files = subject_files(data, list(atlases[:k_needed]))
    results = {ants_row_name(m, k): MultiAtlasRow(ants_row_name(m, k), list(atlases[:k]), [], {})
               for m, k in missing}
    for files in subject_files(data, subjects):
        if files.label is None:
            raise VolumeError(files.image, "a validation subject needs a label map to be scored")
        target = load_image(files.image)
        truth = load_label_map(files.label).array
        target_normalised = normalise_intensity(target.array, source=target.path)
        warped = [cache.warped_atlas(a, files, target) for a in atlas_files]
        for method, k in missing:
            name = ants_row_name(method, k)
            clock = time.perf_counter()
            fused = fuse_atlases([w.labels for w in warped[:k]], [w.image for w in warped[:k]],
                                 target_normalised, "majority" if method == "single" else method,
                                 target.affine, jlf)
            fusion_seconds = time.perf_counter() - clock
            row = results[name]
            row.scores.append(evaluation.evaluate_pair(fused, truth, table, files.id))
            row.seconds[files.id] = sum(w.seconds for w in warped[:k]) + fusion_seconds
            row.extra.setdefault("fusion_seconds", {})[files.id] = fusion_seconds
            if save_segmentations:
                save_volume(fused, out_dir / name / "segmentations" / f"{files.id}.nii.gz",
                            target.affine)
        print(f"[multi-atlas] {files.id}: " + ", ".join(
            f"{n} {100 * r.scores[-1].mean_structure:.1f}" for n, r in results.items()))
    for name, row in results.items():
        _write_row(out_dir / name, keys[name], row)
        rows[name] = row
    print(f"[multi-atlas] {cache.registrations_run} registrations computed, kept in "
          f"{cache.folder}")
    return rows


# ----------------------------------------------------------------------------- learned G_F

@dataclass
class LearnedFusion:
    """Multi-atlas rows with a trained G_F (optionally refined per scan) as the registration:
    ``rows[name]`` (scores and seconds per subject: k segmentations + the fusion; names from
    :func:`learned_row_name`), the ``atlases`` in order and the mean seconds of one
    segmentation (per scan and atlas). Unpacks as ``(scores, atlases,
    seconds_per_scan_and_atlas)`` with the majority-vote rows' scores by k."""
    rows: Dict[str, MultiAtlasRow]
    atlases: List[str]
    seconds_per_scan_and_atlas: float
    refined: bool = False

    def row(self, fusion: str, k: int) -> MultiAtlasRow:
        return self.rows[learned_row_name(k, fusion, self.refined)]

    @property
    def scores(self) -> Dict[int, List[evaluation.SubjectScores]]:
        return {len(row.atlases): row.scores for name, row in self.rows.items()
                if name == learned_row_name(len(row.atlases), "majority", self.refined)}

    def __iter__(self):
        return iter((self.scores, self.atlases, self.seconds_per_scan_and_atlas))


def learned_row_name(k: int, fusion: str = "majority", refined: bool = False) -> str:
    """``ltnet_gf_k1``, ``ltnet_gf_majority_k3``, ``ltnet_gf_refine_jlf_k5``, ..."""
    stem = "ltnet_gf_refine" if refined else "ltnet_gf"
    return f"{stem}_k1" if k == 1 else f"{stem}_{fusion}_k{k}"


def learned_multi_atlas(run_dir, config, ks: Sequence[int], out_dir=None,
                        atlases: Optional[Sequence[str]] = None, refine=None,
                        fusions: Sequence[str] = ("majority",),
                        jlf: Optional[JointFusionSettings] = None) -> LearnedFusion:
    """Multi-atlas segmentation with a trained LT-Net forward generator.

    The atlases are ``atlases`` or the top ``max(ks)`` of :func:`ranked_atlases` (the run's
    own atlas first, so k = 1 is plain LT-Net). Each is passed to G_F as the moving image; with
    ``refine`` (:class:`~ltnet_keras.inference.refine.RefineSettings`) its field is refined on
    each scan; its labels are warped onto each validation scan (Eq. 2) and the first ``k``
    warped label maps are fused by each of ``fusions`` (:func:`fuse_atlases`: majority vote
    with ties to the atlas whose warped image correlates best with the scan, or joint label
    fusion). Each atlas' segmenter runs once, untimed, before the timed scans (tracing). This
    is NOT MABMIS; for k > 1 it uses k labelled scans, so it leaves the one-shot setting, as
    multi-atlas methods do. With ``out_dir`` the rows are kept in ``out_dir/<row>/`` and read
    back while run, atlases, subjects and settings stay the same.
    """
    from ltnet_keras.data.dataset import subject_files
    from ltnet_keras.data.io import load_image, load_label_map
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.data.preprocess import normalise_intensity
    from ltnet_keras.inference.segment import Segmenter, warp_image
    from ltnet_keras.training import FORWARD_WEIGHTS

    run_dir = Path(run_dir)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"numbers of atlases must be >= 1; got {ks}")
    jlf = jlf or JointFusionSettings()
    if atlases is None:
        own = json.loads((run_dir / "atlas.json").read_text())["atlas"]
        atlases = ranked_atlases(config.data, own, max(ks))
    atlases = list(atlases)
    ks = [k for k in ks if k <= len(atlases)]
    subjects = list(config.data.val_subjects)
    interp = config.segment.label_interp
    weights = run_dir / FORWARD_WEIGHTS
    refined = refine is not None
    wanted = [(("majority" if k == 1 else fusion), k) for k in ks
              for fusion in (["majority"] if k == 1 else fusions)]
    base = {"run_dir": shown_path(run_dir), "label_interp": interp, "subjects": subjects,
            "weights_mtime_ns": weights.stat().st_mtime_ns if weights.exists() else None,
            "refine": refine.to_dict() if refined else None}
    keys = {learned_row_name(k, f, refined): _json({
        **base, "method": "ltnet_gf_" + f, "atlases": atlases[:k],
        **({"jlf": jlf.to_dict()} if f == "jlf" and k > 1 else {})}) for f, k in wanted}
    if out_dir is not None:
        kept = {name: _read_row(Path(out_dir) / name, key) for name, key in keys.items()}
        if all(row is not None for row in kept.values()):
            print(f"[G_F multi-atlas] rows finished, reading them from {out_dir}")
            first = kept[learned_row_name(ks[0], "majority", refined)]
            return LearnedFusion(kept, atlases,
                                 float(first.extra["seconds_per_scan_and_atlas"]), refined)

    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    segmenters = []
    for files in subject_files(config.data, atlases[:max(ks)]):
        if files.label is None:
            raise VolumeError(files.image, f"atlas candidate {files.id} has no label map")
        segmenters.append(Segmenter(run_dir, atlas_image=str(files.image),
                                    atlas_labels=str(files.label), label_interp=interp,
                                    refine=refine))
    targets = subject_files(config.data, subjects)
    for segmenter in segmenters:
        segmenter.segment(targets[0].image)
    rows = {name: MultiAtlasRow(name, atlases[:k], [], {})
            for name, (_, k) in zip(keys, wanted)}
    per_atlas = []
    for files in targets:
        target = load_image(files.image)
        normalised = normalise_intensity(target.array, source=target.path)
        truth = load_label_map(files.label).array
        maps, warped_images, seconds = [], [], []
        for segmenter in segmenters:
            clock = time.perf_counter()
            result = segmenter.segment(files.image)
            seconds.append(time.perf_counter() - clock)
            maps.append(result.labels)
            warped_images.append(normalise_intensity(
                warp_image(segmenter.atlas_image, result.sampling_positions)))
        per_atlas += seconds
        for name, (fusion, k) in zip(keys, wanted):
            clock = time.perf_counter()
            fused = fuse_atlases(maps[:k], warped_images[:k], normalised, fusion,
                                 target.affine, jlf)
            rows[name].seconds[files.id] = sum(seconds[:k]) + time.perf_counter() - clock
            rows[name].scores.append(evaluation.evaluate_pair(fused, truth, table, files.id))
        print(f"[G_F multi-atlas] {files.id}: " + ", ".join(
            f"{name} {100 * r.scores[-1].mean_structure:.1f}" for name, r in rows.items()))
    seconds_per_scan_and_atlas = float(np.mean(per_atlas)) if per_atlas else float("nan")
    if out_dir is not None:
        for name, row in rows.items():
            row.extra["seconds_per_scan_and_atlas"] = seconds_per_scan_and_atlas
            _write_row(Path(out_dir) / name, keys[name], row)
    return LearnedFusion(rows, atlases, seconds_per_scan_and_atlas, refined)
