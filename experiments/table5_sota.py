"""Table 5: LT-Net against VoxelMorph, DataAug and a fully supervised U-Net (Sec. 6.5).

Rows, in the paper's order:

* atlas labels, no registration (the floor: affine pre-alignment only);
* VoxelMorph, LT-Net (paper weights), LT-Net (recipe): registration runs, one YAML each in
  experiments/configs/table5/ (trained in <out>/<row>/), or finished runs given with
  --runs voxelmorph=DIR ltnet=DIR ltnet_tuned=DIR, whose files segmentation needs
  (forward_generator.h5, config.yaml, atlas.json, history.csv, results.md, ...; no checkpoints)
  are copied to <out>/<row>/ so that `ltnet segment --run <out>/<row>` works on them;
* DataAug (Zhao et al., CVPR 2019; ltnet_keras.baselines.dataaug): the segmentation U-Net trained on
  volumes synthesised from the atlas alone, with <out>/voxelmorph/ as its spatial model;
* U-Net (upper bound; ltnet_keras.baselines.segnet): the same U-Net trained on the labels of every
  training scan.

Every row is scored on the validation subjects' own full-resolution grids. Writes in <out>:
table5.md / table5.csv (mean (std), min, max over subjects next to the paper's CANDI numbers),
table5_subjects.csv (per subject and row), table5.png (box plot), provenance.json. Finished rows
are read back, not redone; an interrupted row resumes from its last checkpoint.

    python experiments/table5_sota.py --out runs/table5
    python experiments/table5_sota.py --runs voxelmorph=runs/x/voxelmorph ltnet=runs/x/ltnet
    python experiments/table5_sota.py --smoke --out /tmp/smoke/table5
"""
import json
from pathlib import Path
from typing import Dict, List, Optional

from common import (CONFIG_DIR, NO_REGISTRATION, TABLE_ROWS, Row, baseline_scores, build_parser,
                    overrides_from_args, parse_set, run_atlas, score_existing_run,
                    train_and_score, write_provenance, write_table)
from ltnet_keras import evaluation
from ltnet_keras.config import load_config
from ltnet_keras.study.sota_table import NOTES, SUBJECTS_CSV, Table5Result, subjects_csv  # noqa: F401
from ltnet_keras.study.table_run import INSTALLED, install_run

TABLE = "table5"
# Row key -> (label in our table, the paper's row).
LABELS = TABLE_ROWS[TABLE]
ROWS = list(LABELS)
SEGNET_ROWS = {row: LABELS[row] for row in ("dataaug", "unet")}
REGISTRATION_ROWS = {row: label for row, label in LABELS.items() if row not in SEGNET_ROWS}
# DataAug's spatial model is the VoxelMorph row.
SPATIAL_ROW = "voxelmorph"
FLOOR_CSV = "scores_no_registration.csv"
# --smoke for the U-Net rows (besides the registration rows' tiny grid and subjects).
SEGNET_SMOKE = {"train.steps": 10, "train.checkpoint_every": 10,
                "dataaug.appearance.steps": 10, "dataaug.appearance.checkpoint_every": 10}


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

def collect(args) -> Table5Result:
    """Every requested row (trained, resumed, or read back) and the floor, in ``args.out``."""
    from ltnet_keras.baselines.segnet import run_segnet_experiment
    from ltnet_keras.baselines.segnet_config import load_segnet_config
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
        print(f"WARNING: rows differ in atlas {atlases} or validation subjects {held_out}")
    if registration:
        floor_config, atlas = configs[registration[0]], atlases[registration[0]]
    else:
        from ltnet_keras.data.dataset import resolve_atlas
        floor_config = configs[rows[0]]
        atlas = resolve_atlas(floor_config.data)
    baseline = baseline_scores(floor_config, atlas)
    evaluation.write_scores_csv(baseline, out / FLOOR_CSV)
    return Table5Result(out, rows, configs, run_dirs, scores, baseline, atlas, overrides,
                        seg_overrides, LABELS)


def write_outputs(result: Table5Result) -> str:
    rows = [Row(NO_REGISTRATION, result.baseline, note="floor: affine pre-alignment only")]
    rows += [Row(LABELS[r][0], result.scores[r], LABELS[r][1]) for r in result.rows]
    steps = {r: c.train.steps for r, c in result.configs.items()}
    grid = next(iter(result.configs.values())).data.network_shape
    title = (f"Table 5: comparison with other methods — atlas {result.atlas}, "
             f"{len(result.baseline)} validation subjects, network grid {grid}, steps {steps}")
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
