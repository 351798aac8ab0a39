"""A paper table end to end: train (or resume, or reuse) every row's run, score its validation
subjects, add the no-registration floor, and write the table files with provenance.

A row's run lives in ``<out>/<row>/`` (a normal run directory: an interrupted run resumes, a
finished and scored one is read back, not redone); recipe-weights rows (keys ``ROW@recipe``)
in ``<out>/recipe/<row>/``. The table files come from :mod:`ltnet_keras.study.tables`.
"""
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import yaml

from ltnet_keras import evaluation
from ltnet_keras.config import ExperimentConfig, config_to_dict, load_config
from ltnet_keras.records import atomic_write_text, file_digest, shown_path
from ltnet_keras.study.recipe import (PAPER_WEIGHTS, RECIPE_DIR_NAME, RECIPE_SUFFIX,
                                      RECIPE_WEIGHTS, config_differences, has_ltnet_terms,
                                      ignored_recipe_settings, recipe_variant,
                                      switched_off_by_recipe, training_key)
from ltnet_keras.study.tables import Row, write_provenance, write_table

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
    # Table 4 has no rows of its own: it reads Table 5's.
    "table5": {"voxelmorph": ("VoxelMorph", "VoxelMorph"),
               "dataaug": ("DataAug", "DataAug"),
               "ltnet": ("LT-Net (paper weights)", "LT-Net"),
               "ltnet_tuned": ("LT-Net (recipe)", "LT-Net"),
               "unet": ("U-Net (upper bound)", "U-Net (upper bound)")},
}
# What a registration run directory needs for `ltnet segment` and a table (no checkpoints).
RUN_FILES = ("forward_generator.h5", "config.yaml", "atlas.json", "environment.json",
             "history.csv", "results.md", "summary.csv", "loss_curve.png",
             "backward_generator.h5")
#: Written into an installed run: where it came from and which weights it holds.
INSTALLED = "installed_from.json"
NO_REGISTRATION = "Atlas labels, no registration"


def load_rows(paths: Sequence[Path],
              overrides: Optional[dict] = None) -> Dict[str, ExperimentConfig]:
    """Row name (file stem) -> validated config, with ``overrides`` (dotted keys) applied."""
    return {Path(p).stem: load_config(p, overrides) for p in paths}


def _scores_path(run_dir: Path, config: ExperimentConfig) -> Path:
    return Path(run_dir) / f"scores_{config.preset}_{config.segment.label_interp}.csv"


def _saved_config(run_dir: Path) -> Optional[ExperimentConfig]:
    try:
        return load_config(Path(run_dir) / "config.yaml")
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return None


def _current_scores(run_dir: Path, config: ExperimentConfig) -> Optional[Path]:
    """The run's score file for ``config``, if the run finished with ``config`` (its name
    aside: the recipe search names its runs differently) and the file is newer than its
    weights and covers the validation subjects. A table run writes ``scores_<preset>_<interp>``,
    the recipe search ``scores_<name>_<interp>``: either is read."""
    from ltnet_keras.training import FORWARD_WEIGHTS
    run_dir = Path(run_dir)
    weights = run_dir / FORWARD_WEIGHTS
    saved = _saved_config(run_dir)
    if not weights.exists() or saved is None or config_differences(saved, config):
        return None
    interp = config.segment.label_interp
    for path in (_scores_path(run_dir, config), run_dir / f"scores_{saved.name}_{interp}.csv"):
        if not path.exists() or path.stat().st_mtime < weights.stat().st_mtime:
            continue
        subjects = [s.subject for s in evaluation.read_scores_csv(path)]
        if subjects == list(config.data.val_subjects):
            return path
    return None


def _scores_current(run_dir: Path, config: ExperimentConfig) -> bool:
    """The run finished with ``config`` (up to its name) and has current scores for it."""
    return _current_scores(run_dir, config) is not None


def train_and_score(config: ExperimentConfig, run_dir, verbose: int = 2
                    ) -> List[evaluation.SubjectScores]:
    """Train (or resume) one row and score its validation subjects; a finished, scored run with
    the same config (up to its name) is read back from its score file instead."""
    from ltnet_keras.study.experiment import run_experiment
    run_dir = Path(run_dir)
    current = _current_scores(run_dir, config)
    if current is not None:
        print(f"[{config.name}] finished and scored: reading {current}")
        return evaluation.read_scores_csv(current)
    print(f"[{config.name}] preset {config.preset}, {config.train.steps} steps, grid "
          f"{config.data.network_shape} -> {run_dir}")
    run_experiment(config, run_dir, verbose=verbose,
                   label_interps=(config.segment.label_interp,))
    return evaluation.read_scores_csv(_scores_path(run_dir, config))


def score_existing_run(run_dir) -> tuple:
    """(config, scores) of a finished run given on the command line; scores it if needed."""
    from ltnet_keras.study.experiment import segment_and_score
    from ltnet_keras.training import FORWARD_WEIGHTS
    run_dir = Path(run_dir)
    if not (run_dir / FORWARD_WEIGHTS).exists():
        raise SystemExit(f"{run_dir}: not a finished run (no {FORWARD_WEIGHTS})")
    config = _saved_config(run_dir)
    if config is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: missing or not a valid config")
    path = _current_scores(run_dir, config)
    if path is None:
        path = _scores_path(run_dir, config)
        scores = segment_and_score(run_dir, config, list(config.data.val_subjects),
                                   config.segment.label_interp)
        evaluation.write_scores_csv(scores, path)
    print(f"[{run_dir}] reusing finished run ({config.preset}, {config.train.steps} steps)")
    return config, evaluation.read_scores_csv(path)


def run_atlas(run_dir) -> str:
    return json.loads((Path(run_dir) / "atlas.json").read_text())["atlas"]


def baseline_scores(config: ExperimentConfig, atlas: str) -> List[evaluation.SubjectScores]:
    """The floor: the atlas labels scored against each validation subject, no registration."""
    from ltnet_keras.study.experiment import no_registration_scores
    return no_registration_scores(config, atlas, list(config.data.val_subjects))


@dataclasses.dataclass
class TableResult:
    configs: Dict[str, ExperimentConfig]
    run_dirs: Dict[str, Path]
    scores: Dict[str, List[evaluation.SubjectScores]]
    baseline: List[evaluation.SubjectScores]
    markdown: str
    rows: List[Row] = dataclasses.field(default_factory=list)
    # key -> {"run": DIR, "differences": [...]} (given with --runs) or {"shared_with": KEY}
    reuse: Dict[str, dict] = dataclasses.field(default_factory=dict)


def collect_runs(configs: Mapping[str, ExperimentConfig], run_dirs: Mapping[str, Path],
                 runs: Optional[Mapping[str, Path]] = None, verbose: int = 2) -> tuple:
    """Train and score every key of ``configs`` in ``run_dirs[key]`` (resuming; a finished,
    scored run is read back). ``runs[key]``: a finished run used instead, whatever its config
    (differences from ``configs[key]`` are printed and recorded). A key that trains exactly like
    an earlier one (:func:`training_key`) shares that run.

    Returns (configs, run_dirs, scores, reuse), keyed like ``configs``; reused runs replace
    their key's config and directory; ``reuse`` records what was reused or shared.
    """
    runs = dict(runs or {})
    unused = sorted(set(runs) - set(configs))
    if unused:
        print(f"WARNING: --runs {unused} are not rows of this run (rows: {list(configs)})")
    configs, run_dirs = dict(configs), {key: Path(d) for key, d in run_dirs.items()}
    scores, reuse, first_of = {}, {}, {}
    for key, config in list(configs.items()):
        if key in runs:
            reused, scores[key] = score_existing_run(runs[key])
            differences = config_differences(config, reused)
            if differences:
                print(f"WARNING: {key} reuses {runs[key]}, whose config differs from the row's "
                      f"(row != run): " + "; ".join(differences))
            reuse[key] = {"run": str(runs[key]), "differences": differences}
            configs[key], run_dirs[key] = reused, Path(runs[key])
        elif training_key(config) in first_of:
            shared = first_of[training_key(config)]
            print(f"[{key}] trains exactly like {shared} (same weights and settings): "
                  f"sharing its run {run_dirs[shared]}")
            scores[key], run_dirs[key] = scores[shared], run_dirs[shared]
            reuse[key] = {"shared_with": shared}
        else:
            scores[key] = train_and_score(config, run_dirs[key], verbose)
        first_of.setdefault(training_key(configs[key]), key)
    return configs, run_dirs, scores, reuse


def _baseline(configs: Mapping[str, ExperimentConfig], run_dirs: Mapping[str, Path]):
    """The no-registration floor, once, from the first row's atlas and validation subjects."""
    first = next(iter(configs))
    atlases = {key: run_atlas(d) for key, d in run_dirs.items()}
    held_out = {key: list(c.data.val_subjects) for key, c in configs.items()}
    if len(set(atlases.values())) > 1 or len({tuple(v) for v in held_out.values()}) > 1:
        print(f"WARNING: rows differ in atlas {atlases} or validation subjects; the "
              f"no-registration row uses row {first!r}")
    return baseline_scores(configs[first], atlases[first])


def collect_rows(table: str, config_paths: Sequence[Path], out_root,
                 overrides: Optional[dict] = None, runs: Optional[Mapping[str, Path]] = None,
                 verbose: int = 2):
    """Train/score each row in ``<out_root>/<row>`` (``runs`` maps a row to a finished run to
    reuse instead). Returns (configs, run_dirs, scores, baseline scores), keyed by row."""
    out_root = Path(out_root)
    configs = load_rows(config_paths, overrides)
    if not configs:
        raise SystemExit(f"{table}: no rows to run")
    configs, run_dirs, scores, _ = collect_runs(
        configs, {row: out_root / row for row in configs}, runs, verbose)
    return configs, run_dirs, scores, _baseline(configs, run_dirs)


def twin_configs(paper: Mapping[str, ExperimentConfig],
                 recipe: ExperimentConfig) -> Dict[str, ExperimentConfig]:
    """Every row with the paper's weights, then ``ROW@recipe`` (:func:`recipe_variant`) for
    each row with LT-Net terms; VoxelMorph's row has none and serves both weight sets."""
    configs = dict(paper)
    for row, config in paper.items():
        if has_ltnet_terms(config):
            configs[row + RECIPE_SUFFIX] = recipe_variant(config, recipe)
    return configs


def run_dir_for(out_root, key: str) -> Path:
    """``ROW`` -> ``<out>/ROW``; ``ROW@recipe`` -> ``<out>/recipe/ROW``."""
    row, suffix = key.split("@", 1) if "@" in key else (key, "")
    return Path(out_root) / RECIPE_DIR_NAME / row if suffix else Path(out_root) / row


def table_rows(table: str, rows: Sequence[str], scores: Mapping[str, list],
               baseline: list) -> List[Row]:
    """The floor, then each row; a row with a recipe variant in ``scores`` appears twice (paper
    and recipe weights), one without (VoxelMorph, or a paper-only table) once."""
    labels = TABLE_ROWS.get(table, {})
    out = [Row(NO_REGISTRATION, baseline, note="floor: affine pre-alignment only")]
    for row in rows:
        label, paper = labels.get(row, (row, None))
        if row + RECIPE_SUFFIX in scores:
            out += [Row(label, scores[row], paper, variant=PAPER_WEIGHTS),
                    Row(label, scores[row + RECIPE_SUFFIX], paper, variant=RECIPE_WEIGHTS)]
        else:
            out.append(Row(label, scores[row], paper))
    return out


def _recipe_notes(table: str, recipe_path: Path, recipe: ExperimentConfig,
                  paper: Mapping[str, ExperimentConfig], stands_in_for: Optional[Path] = None,
                  root: Optional[Path] = None) -> List[str]:
    weights = ", ".join(f"{k} {v:g}" for k, v in recipe.weights.terms().items())
    penalties = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(recipe.penalties).items())
    stand_in = (" (a stand-in: the tuned recipe "
                f"{shown_path(stands_in_for, root)} did not exist when this table ran)"
                if stands_in_for is not None else "")
    notes = [f"Recipe weights: {shown_path(recipe_path, root)}{stand_in}: weights {weights}; penalties "
             f"{penalties}. Each row keeps the terms the paper's row switches off at 0; every "
             "other term takes the recipe's weight, the penalties are the recipe's, everything "
             "else (grid, steps, seed) is the row's. Rows without LT-Net's terms (VoxelMorph) "
             "and the floor are the same under both weight sets and shown in both blocks."]
    labels = TABLE_ROWS.get(table, {})
    for row, config in paper.items():
        off = switched_off_by_recipe(config, recipe)
        if off and has_ltnet_terms(config):
            notes.append(f"The recipe sets {', '.join(off)} to 0: row "
                         f"'{labels.get(row, (row,))[0]}' with recipe weights has no "
                         f"{', '.join(off)} term.")
    ignored = ignored_recipe_settings(recipe)
    if ignored:
        message = (f"The recipe's training settings {', '.join(ignored)} are NOT used: only its "
                   "weights and penalties are.")
        print(f"WARNING: {message}")
        notes.append(message)
    return notes


def _row_label(table: str, key: str) -> str:
    """``'+ L_GAN' (recipe weights)`` for the key ``gan@recipe`` of Table 1."""
    row = key.split("@", 1)[0]
    name = TABLE_ROWS.get(table, {}).get(row, (row,))[0]
    return f"'{name}' ({RECIPE_WEIGHTS})" if key.endswith(RECIPE_SUFFIX) else f"'{name}'"


def _wall_time_note(table: str, seconds: Mapping[str, Optional[float]],
                    reuse: Mapping[str, dict]) -> str:
    """One line: each trained run's training wall time (a shared run once)."""
    timed = [f"{_row_label(table, key)} {value / 60:.1f}" for key, value in seconds.items()
             if value is not None and "shared_with" not in reuse.get(key, {})]
    untimed = [_row_label(table, key) for key, value in seconds.items() if value is None]
    note = ("Training wall time (minutes, this machine's 2 CPU cores, all sittings): "
            + (", ".join(timed) if timed else "none recorded"))
    if untimed:
        note += f"; not recorded (trained before the clock) for {', '.join(untimed)}"
    return note + "."


def _reuse_notes(table: str, reuse: Mapping[str, dict]) -> List[str]:
    notes = []
    for key, record in reuse.items():
        label = _row_label(table, key)
        if "shared_with" in record:
            notes.append(f"{label} trains exactly like "
                         f"{_row_label(table, record['shared_with'])}: one run serves both.")
        elif record["differences"]:
            notes.append(f"{label} reuses {record['run']}, whose config differs from the "
                         "row's: " + "; ".join(record["differences"]) + ".")
    return notes


def run_table(table_name: str, config_paths: Sequence[Path], out_root,
              overrides: Optional[dict] = None, runs: Optional[Mapping[str, Path]] = None,
              extra_rows: Sequence[Row] = (), notes: Sequence[str] = (), title: str = "",
              verbose: int = 2, recipe: Optional[Path] = None,
              recipe_stands_in_for: Optional[Path] = None,
              root: Optional[Path] = None) -> TableResult:
    """Run every row of a table (resuming), then write ``<table>.md``, ``.csv``,
    ``_subjects.csv``, ``.png`` and ``provenance.json`` in ``out_root``: our rows next to the
    paper's, the no-registration floor and ``extra_rows`` (e.g. paper rows we do not reproduce).

    ``recipe``: a config whose weights and penalties give every row a second run
    (:func:`twin_configs`; keys ``ROW@recipe``, runs in ``<out>/recipe/ROW``); the table then
    shows a paper-weights and a recipe-weights block side by side; ``recipe_stands_in_for``:
    the tuned recipe that ``recipe`` replaces, if it is a stand-in (said in the notes).
    ``root``: paths under it are shown relative to it in the notes (the repository).
    """
    out_root = Path(out_root)
    paper = load_rows(config_paths, overrides)
    if not paper:
        raise SystemExit(f"{table_name}: no rows to run")
    notes = list(notes)
    extra = {}
    configs = dict(paper)
    if recipe is not None:
        recipe_config = load_config(recipe)
        configs = twin_configs(paper, recipe_config)
        notes = _recipe_notes(table_name, recipe, recipe_config, paper, recipe_stands_in_for,
                              root) + notes
        extra["recipe"] = {"path": str(recipe), "config": config_to_dict(recipe_config),
                           "ignored_settings": ignored_recipe_settings(recipe_config)}
    missing = sorted(key for key in (runs or {}) if RECIPE_SUFFIX in key and key not in configs)
    if missing:
        raise SystemExit(f"--runs {missing}: no such recipe-weights row in this run (rows: "
                         f"{list(configs)}; VoxelMorph has no recipe variant, and --paper-only "
                         "has none at all)")
    configs, run_dirs, scores, reuse = collect_runs(
        configs, {key: run_dir_for(out_root, key) for key in configs}, runs, verbose)
    baseline = _baseline(configs, run_dirs)
    rows = table_rows(table_name, list(paper), scores, baseline) + list(extra_rows)
    notes += _reuse_notes(table_name, reuse)
    from ltnet_keras.training import train_seconds
    seconds = {key: train_seconds(d) for key, d in run_dirs.items()}
    notes.append(_wall_time_note(table_name, seconds, reuse))
    extra["train_seconds"] = seconds
    first = next(iter(configs.values()))
    steps = sorted({c.train.steps for c in configs.values()})
    title = (f"{title or table_name} — atlas {run_atlas(next(iter(run_dirs.values())))}, "
             f"{len(first.data.val_subjects)} validation subjects, network grid "
             f"{first.data.network_shape}, steps {steps}")
    markdown = write_table(out_root, table_name, title, rows, notes)
    extra.update({"run_dirs": {key: str(d) for key, d in run_dirs.items()}, "reuse": reuse})
    write_provenance(out_root, table_name, configs, overrides, extra)
    return TableResult(configs, run_dirs, scores, baseline, markdown, rows, reuse)


def install_run(source: Path, destination: Path) -> Path:
    """Copy what segmentation and the table need of a finished run to ``destination`` (no
    checkpoints); a destination holding other weights is refused, not overwritten."""
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
        {"source": shown_path(source.resolve()), "forward_generator_sha256": digest}, indent=2))
    return destination
