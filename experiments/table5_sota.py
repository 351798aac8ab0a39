"""Table 5: LT-Net against VoxelMorph, DataAug and a fully supervised U-Net (Sec. 6.5).

Rows, in the paper's order:

* atlas labels, no registration (the floor: affine pre-alignment only);
* VoxelMorph, LT-Net (paper weights), LT-Net (recipe): registration runs, one YAML each in
  experiments/configs/table5/ (trained in <out>/<row>/), or finished runs given with
  --runs voxelmorph=DIR ltnet=DIR ltnet_tuned=DIR, whose files segmentation needs
  (forward_generator.h5, config.yaml, atlas.json, history.csv, results.md, ...; no checkpoints)
  are copied to <out>/<row>/ so that `ltnet segment --run <out>/<row>` works on them;
* DataAug (Zhao et al., CVPR 2019; ltnet_keras.dataaug): the segmentation U-Net trained on
  volumes synthesised from the atlas alone, with <out>/voxelmorph/ as its spatial model;
* U-Net (upper bound; ltnet_keras.segnet): the same U-Net trained on the labels of every
  training scan.

Every row is scored on the held-out subjects' own full-resolution grids. Writes in <out>:
table5.md / table5.csv (mean (std), min, max over subjects next to the paper's CANDI numbers),
table5_subjects.csv (per subject and row), table5.png (box plot), provenance.json. Finished rows
are read back, not redone; an interrupted row resumes from its last checkpoint.

    python experiments/table5_sota.py --out runs/table5
    python experiments/table5_sota.py --runs voxelmorph=runs/x/voxelmorph ltnet=runs/x/ltnet
    python experiments/table5_sota.py --smoke --out /tmp/smoke/table5
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from common import (CONFIG_DIR, NO_REGISTRATION, TABLE_ROWS, Row, baseline_scores, build_parser,
                    overrides_from_args, parse_set, run_atlas, score_existing_run,
                    train_and_score, write_provenance, write_table)
from ltnet_keras import evaluation
from ltnet_keras.config import load_config
from ltnet_keras.records import atomic_write_text, csv_text

TABLE = "table5"
# Row key -> (label in our table, the paper's row).
LABELS = TABLE_ROWS[TABLE]
ROWS = list(LABELS)
SEGNET_ROWS = {row: LABELS[row] for row in ("dataaug", "unet")}
REGISTRATION_ROWS = {row: label for row, label in LABELS.items() if row not in SEGNET_ROWS}
# DataAug's spatial model is the VoxelMorph row.
SPATIAL_ROW = "voxelmorph"
# What a registration run directory needs for `ltnet segment` and the table (no checkpoints).
RUN_FILES = ("forward_generator.h5", "config.yaml", "atlas.json", "environment.json",
             "history.csv", "results.md", "summary.csv", "loss_curve.png",
             "backward_generator.h5")
INSTALLED = "installed_from.json"
SUBJECTS_CSV = "table5_subjects.csv"
FLOOR_CSV = "scores_no_registration.csv"
# --smoke for the U-Net rows (besides the registration rows' tiny grid and subjects).
SEGNET_SMOKE = {"train.steps": 10, "train.checkpoint_every": 10,
                "dataaug.appearance.steps": 10, "dataaug.appearance.checkpoint_every": 10}
NOTES = [
    "DataAug (Zhao et al., CVPR 2019) is ours (ltnet_keras.dataaug): spatial model = the "
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


# ----------------------------------------------------------------------------- arguments

def build_table5_parser(description: str = __doc__, name: str = TABLE):
    """Table 5's arguments; ``name``: the script's (its output folders, see ``build_parser``)."""
    parser = build_parser(TABLE, description, name=name)
    parser.describe("rows", f"subset of rows (valid: {' '.join(ROWS)}); DataAug brings the "
                            "VoxelMorph row with it")
    parser.describe("steps", "override train.steps of the registration rows")
    parser.add_argument("--runs", nargs="+", metavar="ROW=RUN_DIR", default=[],
                        help="finished registration runs to use instead of training "
                             f"(ROW in {' '.join(REGISTRATION_ROWS)}); copied to <out>/<ROW>/")
    parser.add_argument("--seg-steps", type=int,
                        help="override train.steps of the U-Net rows (DataAug and upper bound)")
    parser.add_argument("--set-seg", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the U-Net rows only, e.g. "
                             "--set-seg dataaug.appearance.steps=100 (--set data.* keys apply "
                             "to every row)")
    return parser


def requested_rows(args) -> List[str]:
    """The rows asked for, in the paper's order; DataAug brings its spatial model's row."""
    unknown = [r for r in (args.rows or []) if r not in ROWS]
    if unknown:
        raise SystemExit(f"{TABLE}: unknown rows {unknown}; valid: {ROWS}")
    rows = [r for r in ROWS if r in (args.rows or ROWS)]
    if "dataaug" in rows and SPATIAL_ROW not in rows:
        rows.insert(0, SPATIAL_ROW)
    return rows


def parse_registration_runs(items) -> Dict[str, Path]:
    runs = {}
    for item in items or ():
        row, sep, path = item.partition("=")
        if not sep or row not in REGISTRATION_ROWS:
            raise SystemExit(f"--runs expects ROW=RUN_DIR with ROW in {list(REGISTRATION_ROWS)}; "
                             f"got {item!r}")
        runs[row] = Path(path)
    return runs


def segnet_overrides(args, registration_overrides: dict) -> dict:
    """The U-Net rows share the registration rows' data (grid, subjects, atlas, root)."""
    # --smoke's, --set's and --data's data.* keys are already among the registration ones.
    overrides = {k: v for k, v in registration_overrides.items() if k.startswith("data.")}
    if getattr(args, "smoke", False):
        overrides.update(SEGNET_SMOKE)
    overrides.update(parse_set(getattr(args, "set_seg", [])))
    if getattr(args, "seg_steps", None) is not None:
        overrides["train.steps"] = args.seg_steps
    return overrides


# ----------------------------------------------------------------------------- registration rows

def install_run(source: Path, destination: Path) -> Path:
    """Copy what segmentation and the table need of a finished run to ``destination`` (no
    checkpoints); a destination holding other weights is refused, not overwritten."""
    from ltnet_keras.segnet import file_digest
    source, destination = Path(source), Path(destination)
    weights = source / RUN_FILES[0]
    if not weights.exists() or not (source / "config.yaml").exists():
        raise SystemExit(f"{source}: not a finished run (no {RUN_FILES[0]} or config.yaml)")
    digest = file_digest(weights)
    if (destination / RUN_FILES[0]).exists():
        if file_digest(destination / RUN_FILES[0]) != digest:
            raise SystemExit(f"{destination} holds another run than {source}; remove it or "
                             "choose another --out")
        if source.resolve() == destination.resolve():
            return destination
    destination.mkdir(parents=True, exist_ok=True)
    if source.resolve() != destination.resolve():
        for path in [source / name for name in RUN_FILES] + sorted(source.glob("scores_*.csv")):
            if path.exists():
                shutil.copy2(path, destination / path.name)
    atomic_write_text(destination / INSTALLED, json.dumps(
        {"source": str(source.resolve()), "forward_generator_sha256": digest}, indent=2))
    return destination


def registration_row(row: str, out: Path, overrides: dict, runs: Dict[str, Path], verbose: int):
    """(config, scores) of one registration row: a given run (installed in ``out/row``), a run
    installed there before, or one trained there."""
    run_dir = out / row
    if row in runs:
        install_run(runs[row], run_dir)
    if row in runs or (run_dir / INSTALLED).exists():
        return score_existing_run(run_dir)
    config = load_config(CONFIG_DIR / TABLE / f"{row}.yaml", overrides)
    return config, train_and_score(config, run_dir, verbose)


# ----------------------------------------------------------------------------- the table

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

    def labelled(self) -> Dict[str, List[evaluation.SubjectScores]]:
        """Our label -> scores, the floor first, then the rows in the paper's order."""
        results = {NO_REGISTRATION: self.baseline}
        results.update({LABELS[row][0]: self.scores[row] for row in self.rows})
        return results


def collect(args) -> Table5Result:
    """Every requested row (trained, resumed, or read back) and the floor, in ``args.out``."""
    from ltnet_keras.segnet import run_segnet_experiment
    from ltnet_keras.segnet_config import load_segnet_config
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = requested_rows(args)
    runs = parse_registration_runs(args.runs)
    overrides = overrides_from_args(args)
    seg_overrides = segnet_overrides(args, overrides)
    configs, run_dirs, scores = {}, {}, {}
    # Registration rows first: DataAug needs the VoxelMorph run.
    for row in [r for r in rows if r in REGISTRATION_ROWS]:
        configs[row], scores[row] = registration_row(row, out, overrides, runs, args.verbose)
        run_dirs[row] = out / row
    for row in [r for r in rows if r in SEGNET_ROWS]:
        row_overrides = dict(seg_overrides)
        if row == "dataaug":
            row_overrides["dataaug.spatial_run"] = str((out / SPATIAL_ROW).resolve())
        configs[row] = load_segnet_config(CONFIG_DIR / TABLE / f"{row}.yaml", row_overrides)
        run_dirs[row] = out / row
        print(f"[{row}] segmentation U-Net ({configs[row].method}), {configs[row].train.steps} "
              f"steps, grid {configs[row].data.network_shape} -> {run_dirs[row]}")
        scores[row] = run_segnet_experiment(configs[row], run_dirs[row], args.verbose)

    registration = [r for r in rows if r in REGISTRATION_ROWS]
    atlases = {r: run_atlas(run_dirs[r]) for r in registration}
    held_out = {r: list(c.data.val_subjects) for r, c in configs.items()}
    if len(set(atlases.values())) > 1 or len({tuple(v) for v in held_out.values()}) > 1:
        print(f"WARNING: rows differ in atlas {atlases} or held-out subjects {held_out}")
    if registration:
        floor_config, atlas = configs[registration[0]], atlases[registration[0]]
    else:
        from ltnet_keras.data.dataset import resolve_atlas
        floor_config = configs[rows[0]]
        atlas = resolve_atlas(floor_config.data)
    baseline = baseline_scores(floor_config, atlas)
    evaluation.write_scores_csv(baseline, out / FLOOR_CSV)
    return Table5Result(out, rows, configs, run_dirs, scores, baseline, atlas, overrides,
                        seg_overrides)


def subjects_csv(result: Table5Result) -> Path:
    """One line per (row, subject): mean Dice over structures and labels, then each structure."""
    results = result.labelled()
    keys = {NO_REGISTRATION: "no_registration", **{LABELS[r][0]: r for r in result.rows}}
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


def write_outputs(result: Table5Result) -> str:
    rows = [Row(NO_REGISTRATION, result.baseline, note="floor: affine pre-alignment only")]
    rows += [Row(LABELS[r][0], result.scores[r], LABELS[r][1]) for r in result.rows]
    steps = {r: c.train.steps for r, c in result.configs.items()}
    grid = next(iter(result.configs.values())).data.network_shape
    title = (f"Table 5: comparison with other methods — atlas {result.atlas}, "
             f"{len(result.baseline)} held-out subjects, network grid {grid}, steps {steps}")
    markdown = write_table(result.out, TABLE, title, rows, NOTES)
    subjects_csv(result)
    installed = {r: json.loads((d / INSTALLED).read_text())["source"]
                 for r, d in result.run_dirs.items() if (d / INSTALLED).exists()}
    write_provenance(result.out, TABLE, result.configs, result.overrides, {
        "segnet_overrides": result.segnet_overrides, "atlas": result.atlas,
        "run_dirs": {r: str(d) for r, d in result.run_dirs.items()},
        "installed_runs": installed})
    return markdown


def main(argv=None) -> Optional[Table5Result]:
    args = build_table5_parser().parse_args(argv)
    result = collect(args)
    print(write_outputs(result))
    return result


if __name__ == "__main__":
    main()
