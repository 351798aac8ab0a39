"""Table 5's content beyond the shared table files: its notes, the record of one run of the
table (rows, runs, scores, floor) and its per-subject CSV with every structure."""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping

import numpy as np

from ltnet_keras import evaluation
from ltnet_keras.records import atomic_write_text, csv_text
from ltnet_keras.study.table_run import NO_REGISTRATION

SUBJECTS_CSV = "table5_subjects.csv"

NOTES = [
    "DataAug (Zhao et al., CVPR 2019) is ours (ltnet_keras.baselines.dataaug): spatial model = the "
    "VoxelMorph row's G_F; appearance model = a U-Net giving an additive intensity change in "
    "atlas space, trained through the forward warp (the paper uses an inverse spatial model "
    "instead); synthetic volumes drawn afresh each step; only the atlas' labels are read. Its "
    "segmenter is the same 3D U-Net as the upper bound.",
    "U-Net (upper bound) is trained on the manual labels of every training scan (20 here, 83 in "
    "the paper). Both U-Net rows run on the registration rows' network grid and their "
    "probabilities are interpolated linearly to each scan's grid before the arg-max.",
    "LT-Net (paper weights) uses Eq. (11)'s weights; LT-Net (recipe) the weights and penalties "
    "of experiments/configs/table5/ltnet_tuned.yaml. Both are beside the paper's LT-Net row.",
]


@dataclass
class Table5Result:
    out: Path
    rows: List[str]
    configs: Dict[str, object]
    run_dirs: Dict[str, Path]
    scores: Dict[str, List[evaluation.SubjectScores]]
    baseline: List[evaluation.SubjectScores]
    atlas: str
    overrides: dict
    segnet_overrides: dict

    labels: Mapping[str, tuple] = None

    def labelled(self) -> Dict[str, List[evaluation.SubjectScores]]:
        """Our label -> scores, the floor first, then the rows in the paper's order."""
        results = {NO_REGISTRATION: self.baseline}
        results.update({self.labels[row][0]: self.scores[row] for row in self.rows})
        return results


def subjects_csv(result: Table5Result) -> Path:
    """One line per (row, subject): mean Dice over structures and labels, then each structure."""
    results = result.labelled()
    keys = {NO_REGISTRATION: "no_registration", **{result.labels[r][0]: r for r in result.rows}}
    structures: List[str] = []
    for scores in results.values():
        for s in scores:
            structures += [name for name in s.structures if name not in structures]
    body = []
    for label, scores in results.items():
        for s in scores:
            body.append([keys[label], label, s.subject, f"{100 * s.mean_structure:.4f}",
                         f"{100 * s.mean_label:.4f}"]
                        + [f"{100 * s.structures.get(n, np.nan):.4f}" for n in structures])
    path = result.out / SUBJECTS_CSV
    atomic_write_text(path, csv_text(["row", "method", "subject", "mean_structure",
                                      "mean_label"] + structures, body))
    return path
