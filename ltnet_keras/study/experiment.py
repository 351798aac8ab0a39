"""One experiment end to end: train, segment the validation subjects, evaluate, report.

Results land in the run directory next to the config and environment record that made them:
``scores_<method>.csv`` (per subject), ``summary.csv`` and ``results.md`` (Tables 1-5 format).
"""
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

from ltnet_keras import evaluation
from ltnet_keras.config import SEGMENT_INTERPOLATIONS, ExperimentConfig
from ltnet_keras.data.dataset import subject_files
from ltnet_keras.data.io import load_label_map
from ltnet_keras.data.labels import LabelTable
from ltnet_keras.evaluation import report  # noqa: F401  (callers import it from here too)


def no_registration_scores(config: ExperimentConfig, atlas: str, subjects: List[str],
                           on_network_grid: bool = False) -> List[evaluation.SubjectScores]:
    """The floor: atlas labels compared to each subject's labels with no registration at all
    (the data are affinely pre-aligned, so this is the "affine only" baseline).

    ``on_network_grid``: compare on the down-sampled grid of ``config`` (the atlas' crop, labels
    sampled by nearest neighbour) instead of at full resolution.
    """
    from ltnet_keras.data.io import load_image
    from ltnet_keras.data.preprocess import GridSpec, normalise_intensity
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    atlas_files, = subject_files(config.data, [atlas])
    grid = None
    if on_network_grid:
        grid = GridSpec.centred_on(normalise_intensity(load_image(atlas_files.image).array),
                                   config.data.crop_shape, config.data.factor)

    def labels_of(files):
        labels = load_label_map(files.label).array
        return labels if grid is None else grid.to_network(labels, "label")

    atlas_labels = labels_of(atlas_files)
    return [evaluation.evaluate_pair(atlas_labels, labels_of(files), table, files.id)
            for files in subject_files(config.data, subjects)]


def segment_and_score(run_dir, config: ExperimentConfig, subjects: List[str],
                      label_interp: str, out_dir=None) -> List[evaluation.SubjectScores]:
    """Segment ``subjects`` with the run's G_F and score them against their manual labels;
    each subject's scores carry the folding statistics of its network-grid forward field."""
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.training import ALIGNED_DIR
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    # Validation scans are aligned once (kept beside the pool's) and scored on their own grid.
    cache = Path(run_dir) / ALIGNED_DIR if config.data.align != "none" else None
    segmenter = Segmenter(run_dir, label_interp=label_interp, alignment_cache=cache)
    out_dir = Path(out_dir or Path(run_dir) / "segmentations" / label_interp)
    scores = []
    for files in tqdm(subject_files(config.data, subjects), desc=f"segment ({label_interp})"):
        result = segmenter.segment_to_files(files.image, out_dir)
        truth = load_label_map(files.label).array
        subject_scores = evaluation.evaluate_pair(result.labels, truth, table, files.id)
        subject_scores.deformation = evaluation.folding_stats(result.network_field)
        scores.append(subject_scores)
    return scores


def run_experiment(config: ExperimentConfig, run_dir, verbose: int = 1,
                   label_interps=SEGMENT_INTERPOLATIONS, baseline: bool = True
                   ) -> Dict[str, List[evaluation.SubjectScores]]:
    """Train (or resume) ``config`` in ``run_dir``, evaluate it on ``val_subjects`` and write
    the report; returns the scores of each method."""
    from ltnet_keras.training import train
    result = train(config, run_dir, verbose=verbose)
    atlas = result.data.atlas.subject
    subjects = list(config.data.val_subjects)
    results = {}
    if baseline and config.data.align == "none":
        # Raw scans in their own spaces have no "unregistered" overlap with the atlas to report.
        results["no_registration"] = no_registration_scores(config, atlas, subjects)
    for interp in label_interps:
        results[f"{config.preset}_{interp}"] = segment_and_score(run_dir, config, subjects,
                                                                 interp)
    title = (f"{config.name}: preset {config.preset}, {result.steps_done} steps, atlas {atlas}, "
             f"network grid {config.data.network_shape}")
    report(run_dir, results, title)
    return results
