"""Shared machinery of the table scripts: rows, training/scoring with resume, paper-style tables.

Each table script (``table1_forward_backward.py`` ... ``table5_sota.py``) parses its arguments
with :func:`build_parser`, loads one YAML per row from ``experiments/configs/<table>/`` and calls
:func:`run_table` (or the pieces it is made of). A row's run lives in ``<out>/<row>/`` (a normal
run directory: an interrupted run resumes, a finished and scored one is read back, not redone);
the table lands in ``<out>/<table>.md`` and ``<out>/<table>.csv`` with ``<out>/provenance.json``.

The paper's numbers (:data:`PAPER_REFERENCE`, :data:`PAPER_TABLE4`) are kept here and nowhere
else. They are on CANDI (103 T1 scans, 28 structures, 160x160x128 crops, long GPU training);
ours are on LPBA40 (56 labels merged into 28 mostly cortical structures), so only the ordering
of the methods can be compared, never the absolute values.
"""
import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import yaml

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras import evaluation
from ltnet_keras.config import ExperimentConfig, config_to_dict, load_config
from ltnet_keras.records import atomic_write_text, csv_text, package_versions
# Table 3's fusion and multi-atlas rows live in the package now; re-exported for callers of
# common.majority_vote / common.multi_atlas_scores.
from ltnet_keras.fusion import majority_vote  # noqa: F401
from ltnet_keras.multi_atlas import learned_multi_atlas as multi_atlas_scores  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

PAPER_NOTE = ("Paper numbers are on CANDI (103 scans, 28 mostly subcortical and tissue labels, "
              "160x160x128 crops, long training on two GPUs); ours are on LPBA40 (28 mostly "
              "cortical merged structures) at a reduced grid and step budget. Compare the ordering "
              "of the rows, not the absolute values.")

# ----------------------------------------------------------------------------- the paper's numbers
# Mean (std), min, max of the per-subject mean Dice (%) over the CANDI test subjects
# (Wang et al., CVPR 2020, Tables 1, 2, 3 and 5). CANDI numbers: NOT comparable in absolute value.
PAPER_REFERENCE: Dict[str, Dict[str, tuple]] = {
    "table1": {
        "VoxelMorph": (76.0, 9.7, 61.7, 80.1),
        "+ L_GAN": (79.0, 3.1, 72.7, 81.9),
        "+ L_GAN + L_cyc": (79.2, 2.8, 72.7, 82.1),
    },
    "table2": {
        "Baseline": (79.2, 2.8, 72.7, 82.1),
        "+ L_trans": (80.9, 2.7, 73.6, 83.2),
        "+ L_anatomy_cyc": (80.5, 2.5, 74.2, 83.1),
        "+ L_trans + L_anatomy_cyc": (81.4, 2.6, 74.4, 83.8),
        "+ L_trans + L_anatomy_cyc + L_diff_cyc": (82.3, 2.5, 75.6, 84.2),
    },
    "table3": {
        "MABMIS, 2 atlases": (70.4, 4.4, 63.0, 75.9),
        "MABMIS, 3 atlases": (74.5, 5.2, 63.2, 80.4),
        "MABMIS, 4 atlases": (77.8, 3.9, 72.0, 82.5),
        "MABMIS, 5 atlases": (81.1, 3.6, 76.0, 85.6),
        "LT-Net, 1 atlas": (82.3, 2.5, 75.6, 84.2),
    },
    "table5": {
        "VoxelMorph": (76.0, 9.7, 61.7, 80.1),
        "DataAug": (80.4, 4.3, 73.8, 84.0),
        "LT-Net": (82.3, 2.5, 75.6, 84.2),
        "U-Net (upper bound)": (86.5, 6.3, 83.7, 89.2),
    },
}
# Table 4: mean Dice (%) per CANDI structure (left and right merged).
PAPER_TABLE4 = {
    "structures": ["Cerebral-WM", "Cerebral-CX", "Lateral-Vent", "Cerebellum-WM", "Cerebellum-CX",
                   "Thalamus-Proper", "Caudate", "Putamen", "Pallidum", "3rd-Vent", "4th-Vent",
                   "Brain-Stem", "Hippocampus", "Amygdala", "CSF", "VentralDC"],
    "rows": {
        "VoxelMorph": [81.7, 87.1, 76.7, 74.0, 86.3, 84.7, 79.6, 83.3, 74.0, 62.9, 69.8, 87.1,
                       59.2, 66.5, 50.9, 76.6],
        "DataAug": [90.5, 93.3, 87.5, 82.3, 93.2, 87.3, 81.3, 82.8, 73.7, 66.3, 72.2, 90.5, 72.5,
                    69.2, 63.3, 80.3],
        "LT-Net": [85.8, 90.9, 83.1, 80.0, 91.6, 87.9, 85.5, 88.4, 80.5, 68.4, 79.7, 92.4, 71.6,
                   71.6, 67.1, 82.3],
        "U-Net (upper bound)": [92.0, 93.1, 91.8, 87.9, 93.1, 90.6, 88.1, 88.7, 82.5, 79.0, 84.9,
                                92.2, 80.3, 75.3, 69.8, 85.9],
    },
}
# The few LPBA40 structures that also exist in CANDI's protocol (for a side-by-side look only).
SHARED_STRUCTURES = {"caudate": "Caudate", "putamen": "Putamen", "hippocampus": "Hippocampus",
                     "brainstem": "Brain-Stem"}

# Rows of each table: config file stem -> (label in our table, paper row it corresponds to).
TABLE_ROWS: Dict[str, Dict[str, tuple]] = {
    "table1": {"voxelmorph": ("VoxelMorph", "VoxelMorph"),
               "gan": ("+ L_GAN", "+ L_GAN"),
               "gan_cyc": ("+ L_GAN + L_cyc", "+ L_GAN + L_cyc")},
    "table2": {"gan_cyc": ("Baseline (+ L_GAN + L_cyc)", "Baseline"),
               "trans": ("+ L_trans", "+ L_trans"),
               "anatomy": ("+ L_anatomy_cyc", "+ L_anatomy_cyc"),
               "trans_anatomy": ("+ L_trans + L_anatomy_cyc", "+ L_trans + L_anatomy_cyc"),
               "ltnet": ("+ L_trans + L_anatomy_cyc + L_diff_cyc (LT-Net)",
                         "+ L_trans + L_anatomy_cyc + L_diff_cyc")},
    "table3": {"ltnet": ("LT-Net", "LT-Net, 1 atlas")},
    "table4": {"voxelmorph": ("VoxelMorph", "VoxelMorph"), "ltnet": ("LT-Net", "LT-Net")},
    "table5": {"voxelmorph": ("VoxelMorph", "VoxelMorph"), "ltnet": ("LT-Net", "LT-Net")},
}
NO_REGISTRATION = "Atlas labels, no registration"

# A grid and subject set small enough to run a table end to end in a minute or two on a CPU
# (``--smoke``; the tests use it too). Not a result: 10 steps train nothing.
SMOKE_OVERRIDES = {
    "train.steps": 10,
    "train.checkpoint_every": 10,
    "data.crop_shape": [128, 192, 128],
    "data.factor": 4,
    "data.train_subjects": ["S11", "S12"],
    "data.val_subjects": ["S13"],
    "data.atlas": "S11",
}


# ----------------------------------------------------------------------------- rows and configs

def config_paths(table: str, rows: Optional[Sequence[str]] = None) -> List[Path]:
    """The YAML of each row of ``table`` (all rows, in the paper's order, unless ``rows``)."""
    known = list(TABLE_ROWS[table])
    rows = list(rows) if rows else known
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SystemExit(f"{table}: unknown rows {unknown}; valid: {known}")
    return [CONFIG_DIR / table / f"{row}.yaml" for row in rows]


def load_rows(paths: Sequence[Path],
              overrides: Optional[dict] = None) -> Dict[str, ExperimentConfig]:
    """Row name (file stem) -> validated config, with ``overrides`` (dotted keys) applied."""
    return {Path(p).stem: load_config(p, overrides) for p in paths}


def parse_set(items: Sequence[str]) -> dict:
    """``["data.factor=4", "data.val_subjects=[S31,S32]"]`` -> dotted overrides (YAML values)."""
    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def build_parser(table: str, description: str, reuse_runs: bool = False
                 ) -> argparse.ArgumentParser:
    """The arguments every table script shares; ``reuse_runs`` adds ``--runs ROW=RUN_DIR``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / table,
                        help="output folder: one run directory per row, the table, provenance "
                             f"(default runs/{table})")
    parser.add_argument("--steps", type=int, help="override train.steps of every trained row")
    parser.add_argument("--rows", nargs="+", metavar="ROW",
                        help=f"subset of rows to train (valid: {' '.join(TABLE_ROWS[table])})")
    parser.add_argument("--data", type=Path, help="dataset root (override data.root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config override, dotted key and YAML value, e.g. "
                             "--set data.factor=4 --set 'data.val_subjects=[S31,S32]'")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny grid, 2 training subjects, 1 held-out, 10 steps: checks the "
                             "pipeline end to end, produces no meaningful numbers")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity (0, 1, 2)")
    if reuse_runs:
        parser.add_argument("--runs", nargs="+", metavar="ROW=RUN_DIR", default=[],
                            help="reuse finished runs instead of training these rows")
    return parser


def overrides_from_args(args) -> dict:
    """``--smoke``, then ``--set``, then ``--data`` and ``--steps`` (later wins)."""
    overrides = dict(SMOKE_OVERRIDES) if getattr(args, "smoke", False) else {}
    overrides.update(parse_set(getattr(args, "set", [])))
    if getattr(args, "data", None):
        overrides["data.root"] = str(args.data)
    if getattr(args, "steps", None) is not None:
        overrides["train.steps"] = args.steps
    return overrides


def parse_runs(items: Optional[Sequence[str]], table: str) -> Dict[str, Path]:
    """``["ltnet=runs/table2/ltnet"]`` -> {row: finished run directory to reuse}."""
    runs = {}
    for item in items or ():
        row, sep, path = item.partition("=")
        if not sep or row not in TABLE_ROWS[table]:
            raise SystemExit(f"--runs expects ROW=RUN_DIR with ROW in {list(TABLE_ROWS[table])}; "
                             f"got {item!r}")
        runs[row] = Path(path)
    return runs


# ----------------------------------------------------------------------------- training and scores

def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _scores_path(run_dir: Path, config: ExperimentConfig) -> Path:
    return Path(run_dir) / f"scores_{config.preset}_{config.segment.label_interp}.csv"


def _scores_current(run_dir: Path, config: ExperimentConfig) -> bool:
    """The run finished with exactly ``config`` and its score file is newer than its weights."""
    from ltnet_keras.training import FORWARD_WEIGHTS
    run_dir = Path(run_dir)
    scores, weights = _scores_path(run_dir, config), run_dir / FORWARD_WEIGHTS
    if not (scores.exists() and weights.exists()):
        return False
    if _read_yaml(run_dir / "config.yaml") != config_to_dict(config):
        return False
    if scores.stat().st_mtime < weights.stat().st_mtime:
        return False
    subjects = [s.subject for s in evaluation.read_scores_csv(scores)]
    return subjects == list(config.data.val_subjects)


def train_and_score(config: ExperimentConfig, run_dir, verbose: int = 2
                    ) -> List[evaluation.SubjectScores]:
    """Train (or resume) one row and score its held-out subjects; a finished, scored run with
    the same config is read back from its ``scores_<preset>_<interp>.csv`` instead."""
    from ltnet_keras.experiment import run_experiment
    run_dir = Path(run_dir)
    if _scores_current(run_dir, config):
        print(f"[{run_dir.name}] finished and scored: reading {_scores_path(run_dir, config).name}")
    else:
        print(f"[{run_dir.name}] preset {config.preset}, {config.train.steps} steps, grid "
              f"{config.data.network_shape} -> {run_dir}")
        run_experiment(config, run_dir, verbose=verbose,
                       label_interps=(config.segment.label_interp,))
    return evaluation.read_scores_csv(_scores_path(run_dir, config))


def score_existing_run(run_dir) -> tuple:
    """(config, scores) of a finished run given on the command line; scores it if needed."""
    from ltnet_keras.experiment import segment_and_score
    from ltnet_keras.training import FORWARD_WEIGHTS
    run_dir = Path(run_dir)
    if not (run_dir / FORWARD_WEIGHTS).exists():
        raise SystemExit(f"{run_dir}: not a finished run (no {FORWARD_WEIGHTS})")
    config = load_config(run_dir / "config.yaml")
    path = _scores_path(run_dir, config)
    if not _scores_current(run_dir, config):
        scores = segment_and_score(run_dir, config, list(config.data.val_subjects),
                                   config.segment.label_interp)
        evaluation.write_scores_csv(scores, path)
    print(f"[{run_dir}] reusing finished run ({config.preset}, {config.train.steps} steps)")
    return config, evaluation.read_scores_csv(path)


def run_atlas(run_dir) -> str:
    return json.loads((Path(run_dir) / "atlas.json").read_text())["atlas"]


def baseline_scores(config: ExperimentConfig, atlas: str) -> List[evaluation.SubjectScores]:
    """The floor: the atlas labels scored against each held-out subject, no registration."""
    from ltnet_keras.experiment import no_registration_scores
    return no_registration_scores(config, atlas, list(config.data.val_subjects))


# ----------------------------------------------------------------------------- provenance

def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_provenance(out_root, table: str, configs: Mapping[str, ExperimentConfig],
                     overrides: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """``provenance.json``: what produced the table (configs, commit, versions, seeds, date)."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    status = _git("status", "--porcelain")
    record = {
        "table": table,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": package_versions(),
        "platform": platform.platform(),
        "overrides": dict(overrides or {}),
        "seeds": {row: c.train.seed for row, c in configs.items()},
        "configs": {row: config_to_dict(c) for row, c in configs.items()},
    }
    record.update(extra or {})
    path = out_root / "provenance.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return path


# ----------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Row:
    """One line of a table: our scores (None: not reproduced) and the paper row next to it."""
    label: str
    scores: Optional[List[evaluation.SubjectScores]]
    paper: Optional[str] = None
    note: str = ""

    @property
    def summary(self) -> Optional[dict]:
        return evaluation.summarise(self.scores) if self.scores else None


def _cell(summary, key):
    if summary is None:
        return "—"
    if key == "mean":
        return f"{summary['mean']:.1f} ({summary['std']:.1f})"
    return f"{summary[key]:.1f}"


def format_markdown_table(rows: Sequence[Row], reference: Mapping[str, tuple]) -> str:
    """Our Mean (std) / Min / Max next to the paper's row (CANDI) for each line."""
    header = ("| Method | Mean (std) | Min | Max | n | Paper row (CANDI) | Paper Mean (std) "
              "| Paper Min | Paper Max |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        s = row.summary
        ref = reference.get(row.paper) if row.paper else None
        ours = [_cell(s, "mean"), _cell(s, "min"), _cell(s, "max"), str(s["n"]) if s else "—"]
        if s is None and row.note:
            ours[0] = row.note
        paper = ([row.paper, f"{ref[0]:.1f} ({ref[1]:.1f})", f"{ref[2]:.1f}", f"{ref[3]:.1f}"]
                 if ref else ["—"] * 4)
        lines.append("| " + " | ".join([row.label, *ours, *paper]) + " |")
    return "\n".join(lines)


def write_table(out_root, table: str, title: str, rows: Sequence[Row], notes: Sequence[str] = (),
                structures: bool = True) -> str:
    """Write ``<table>.md`` and ``<table>.csv`` (plus each row's per-subject CSV); return the
    Markdown. Scores are structure-level: each subject's mean Dice over the merged structures."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    reference = PAPER_REFERENCE.get(table, {})
    body = []
    for row in rows:
        s = row.summary
        ref = reference.get(row.paper) if row.paper else None
        body.append([row.label, "structure", s["n"] if s else "",
                     *([f"{s[k]:.4f}" for k in ("mean", "std", "min", "max")] if s else [""] * 4),
                     row.paper or "", *(list(ref) if ref else [""] * 4), row.note])
    header = ["method", "level", "n", "mean", "std", "min", "max", "paper_row", "paper_mean",
              "paper_std", "paper_min", "paper_max", "note"]
    atomic_write_text(out_root / f"{table}.csv", csv_text(header, body))
    scored = {row.label: row.scores for row in rows if row.scores}
    text = [f"# {title}", "",
            "Dice (%) on the held-out LPBA40 subjects: each subject's mean over the merged "
            "(left/right) structures; Mean (std), Min and Max over subjects (std with ddof=0).",
            "", format_markdown_table(rows, reference), "", f"Note: {PAPER_NOTE}", ""]
    text += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    if structures and scored:
        text += ["Per structure (mean (std) over subjects):", "", "```",
                 evaluation.format_structure_table(scored), "```", ""]
    markdown = "\n".join(text)
    atomic_write_text(out_root / f"{table}.md", markdown)
    return markdown


@dataclasses.dataclass
class TableResult:
    configs: Dict[str, ExperimentConfig]
    run_dirs: Dict[str, Path]
    scores: Dict[str, List[evaluation.SubjectScores]]
    baseline: List[evaluation.SubjectScores]
    markdown: str


def collect_rows(table: str, config_paths: Sequence[Path], out_root,
                 overrides: Optional[dict] = None, runs: Optional[Mapping[str, Path]] = None,
                 verbose: int = 2):
    """Train/score each row (``runs`` maps a row to a finished run to reuse instead).

    Returns (configs, run_dirs, scores, baseline scores), keyed by row.
    """
    out_root = Path(out_root)
    runs = dict(runs or {})
    configs = load_rows(config_paths, overrides)
    run_dirs, scores = {}, {}
    for row, config in configs.items():
        if row in runs:
            configs[row], scores[row] = score_existing_run(runs[row])
            run_dirs[row] = runs[row]
        else:
            run_dirs[row] = out_root / row
            scores[row] = train_and_score(config, run_dirs[row], verbose)
    if not configs:
        raise SystemExit(f"{table}: no rows to run")
    first = next(iter(configs))
    atlases = {row: run_atlas(d) for row, d in run_dirs.items()}
    held_out = {row: list(c.data.val_subjects) for row, c in configs.items()}
    if len(set(atlases.values())) > 1 or len({tuple(v) for v in held_out.values()}) > 1:
        print(f"WARNING: rows differ in atlas {atlases} or held-out subjects; the "
              f"no-registration row uses row {first!r}")
    baseline = baseline_scores(configs[first], atlases[first])
    return configs, run_dirs, scores, baseline


def run_table(table_name: str, config_paths: Sequence[Path], out_root,
              overrides: Optional[dict] = None, runs: Optional[Mapping[str, Path]] = None,
              extra_rows: Sequence[Row] = (), notes: Sequence[str] = (), title: str = "",
              verbose: int = 2) -> TableResult:
    """Run every row of a table (resuming), then write ``<table>.md``, ``<table>.csv`` and
    ``provenance.json`` in ``out_root``: our rows next to the paper's, plus the no-registration
    floor and ``extra_rows`` (e.g. paper rows we do not reproduce)."""
    out_root = Path(out_root)
    configs, run_dirs, scores, baseline = collect_rows(table_name, config_paths, out_root,
                                                       overrides, runs, verbose)
    labels = TABLE_ROWS.get(table_name, {})
    rows = [Row(NO_REGISTRATION, baseline, note="floor: affine pre-alignment only")]
    for row, row_scores in scores.items():
        label, paper = labels.get(row, (row, None))
        rows.append(Row(label, row_scores, paper))
    rows += list(extra_rows)
    first = next(iter(configs.values()))
    title = title or table_name
    steps = sorted({c.train.steps for c in configs.values()})
    title += (f" — atlas {run_atlas(next(iter(run_dirs.values())))}, "
              f"{len(first.data.val_subjects)} held-out subjects, network grid "
              f"{first.data.network_shape}, steps {steps}")
    markdown = write_table(out_root, table_name, title, rows, notes)
    write_provenance(out_root, table_name, configs, overrides,
                     {"run_dirs": {r: str(d) for r, d in run_dirs.items()}})
    return TableResult(configs, run_dirs, scores, baseline, markdown)


# ----------------------------------------------------------------------------- Table 4

def write_structure_table(out_root, table: str, title: str,
                          results: Mapping[str, List[evaluation.SubjectScores]],
                          paper_rows: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """Table 4: Dice (%) of each merged structure, mean (std) over the held-out subjects, one
    column per method (the paper's layout transposed: LPBA40 has 28 structures). ``paper_rows``
    maps our method label to the paper's Table 4 row for the structures both protocols share.
    Writes ``<table>.md`` and ``<table>.csv`` (method, structure, n, mean, std, paper)."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    paper_index = {name: i for i, name in enumerate(PAPER_TABLE4["structures"])}
    body = []
    for method, scores in results.items():
        paper = PAPER_TABLE4["rows"].get(paper_rows.get(method, ""))
        for structure, s in evaluation.structure_summary(scores).items():
            shared = SHARED_STRUCTURES.get(structure)
            ref = paper[paper_index[shared]] if paper and shared else ""
            body.append([method, structure, len(scores), f"{s['mean']:.4f}", f"{s['std']:.4f}",
                         shared or "", ref])
    atomic_write_text(out_root / f"{table}.csv", csv_text(
        ["method", "structure", "n", "mean", "std", "paper_structure", "paper_mean"], body))

    summaries = {method: evaluation.summarise(scores) for method, scores in results.items()}
    shared_lines = ["| Structure (LPBA40 / CANDI) | " + " | ".join(
        f"{m} ours | {paper_rows[m]} paper" for m in results if m in paper_rows) + " |"]
    shared_lines.append("|" + "---|" * (1 + 2 * sum(m in paper_rows for m in results)))
    per_structure = {m: evaluation.structure_summary(s) for m, s in results.items()}
    for ours, theirs in SHARED_STRUCTURES.items():
        cells = []
        for method in results:
            if method not in paper_rows:
                continue
            s = per_structure[method].get(ours)
            cells.append(f"{s['mean']:.1f}" if s else "—")
            cells.append(f"{PAPER_TABLE4['rows'][paper_rows[method]][paper_index[theirs]]:.1f}")
        shared_lines.append(f"| {ours} / {theirs} | " + " | ".join(cells) + " |")
    paper_header = "| Method | " + " | ".join(PAPER_TABLE4["structures"]) + " |"
    paper_lines = [paper_header, "|" + "---|" * (1 + len(PAPER_TABLE4["structures"]))]
    paper_lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |"
                    for name, values in PAPER_TABLE4["rows"].items()]
    text = [f"# {title}", "",
            "Dice (%) of each merged (left/right) LPBA40 structure, mean (std) over the held-out "
            "subjects:", "", "```", evaluation.format_structure_table(results), "```", "",
            "Mean over structures, per subject (Mean (std), Min, Max over subjects):", "", "```",
            evaluation.format_summary_table(summaries), "```", "",
            "Structures both protocols label (ours on LPBA40, the paper's on CANDI):", "",
            *shared_lines, "", "The paper's Table 4 (CANDI; different structures, not comparable "
            "in absolute value):", "", *paper_lines, "", f"Note: {PAPER_NOTE}", ""]
    text += [f"Note: {n}" for n in notes]
    markdown = "\n".join(text) + "\n"
    atomic_write_text(out_root / f"{table}.md", markdown)
    return markdown
