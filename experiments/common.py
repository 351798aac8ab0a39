"""Shared machinery of the table scripts: rows, training/scoring with resume, run reuse.

Each table script (``table1_forward_backward.py`` ... ``table5_sota.py``) parses its arguments
with :func:`build_parser`, loads one YAML per row from ``experiments/configs/<table>/`` and calls
:func:`run_table` (or the pieces it is made of). A row's run lives in ``<out>/<row>/`` (a normal
run directory: an interrupted run resumes, a finished and scored one is read back, not redone);
``--runs ROW=DIR`` reuses a finished run instead. Tables 1 and 2 run each row twice: with the
paper's weights and with a recipe's (:func:`recipe_variant`; runs in ``<out>/recipe/<row>/``,
keys ``ROW@recipe``).

The table files (``<table>.md``, ``.csv``, ``_subjects.csv``, ``.png``, ``provenance.json``) and
the paper's numbers come from :mod:`ltnet_keras.tables`; the names are re-exported here so the
scripts import everything from one place.
"""
import argparse
import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import yaml

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras import evaluation
from ltnet_keras.config import (ExperimentConfig, LossWeights, config_to_dict, flat_config,
                                load_config, validate)
from ltnet_keras.tables import (PAPER_NOTE, PAPER_REFERENCE, PAPER_TABLE4,  # noqa: F401
                                SHARED_STRUCTURES, Row, format_markdown_table, write_provenance,
                                write_structure_table, write_table)
# Table 3's fusion and multi-atlas rows live in the package; re-exported for callers of
# common.majority_vote / common.multi_atlas_scores.
from ltnet_keras.fusion import majority_vote  # noqa: F401
from ltnet_keras.multi_atlas import learned_multi_atlas as multi_atlas_scores  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

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
NO_REGISTRATION = "Atlas labels, no registration"

# A grid and subject set small enough to run a table end to end in a minute or two on a CPU
# (``--smoke``; the tests use it too). Not a result: 10 steps train nothing.
SMOKE_OVERRIDES = {
    "train.steps": 10,
    "train.log_every": 10,
    "train.checkpoint_every": 10,
    "data.crop_shape": [128, 192, 128],
    "data.factor": 4,
    "data.train_subjects": ["S11", "S12"],
    "data.val_subjects": ["S13"],
    "data.atlas": "S11",
}

# ----------------------------------------------------------------------------- recipe variants
# The tuned recipe the lead writes; until it exists, a finished recipe-search setting stands in.
DEFAULT_RECIPE = CONFIG_DIR / "ltnet_tuned.yaml"
STAND_IN_RECIPE = CONFIG_DIR / "recipe" / "06_group_0.1_0.03.yaml"
RECIPE_SUFFIX = "@recipe"
RECIPE_DIR_NAME = "recipe"          # <out>/recipe/<row>/ holds a row's recipe-weights run
PAPER_WEIGHTS, RECIPE_WEIGHTS = "paper weights", "recipe weights"
# The terms LT-Net adds to VoxelMorph (L_sim + L_smooth). A row with none of them is VoxelMorph
# with its own lambda = 1: it is trained once and shown under both weight sets.
LTNET_TERMS = ("gan", "cyc", "trans", "anatomy_cyc", "diff_cyc")
# Recipe settings that are bookkeeping or protocol, not part of what a recipe changes.
_PROTOCOL_TRAIN_KEYS = ("steps", "log_every", "checkpoint_every", "seed", "devices",
                        "jit_compile", "log_grad_norms", "recompute_generators")


def has_ltnet_terms(config: ExperimentConfig) -> bool:
    return any(getattr(config.weights, term) > 0 for term in LTNET_TERMS)


def recipe_variant(row: ExperimentConfig, recipe: ExperimentConfig) -> ExperimentConfig:
    """``row`` trained with ``recipe``'s weights, for the tables' second column.

    A term that is 0 in ``row`` (switched off by the paper's ablation, Tables 1-2) stays 0;
    every other term of Eq. (11) takes the recipe's weight, so a term the recipe sets to 0 is
    off too. Terms beyond Eq. (11) (``inverse_sim``, ``inverse_trans``) are off in every paper
    row, so they stay off. The NCC window and the penalties (Eq. 7, 8, 10 and the reconstruction of Eq. 5)
    are the recipe's. Data, network, training protocol and preset are the row's; the name gets
    a ``_recipe`` suffix. Pure: neither argument is modified.
    """
    weights = {term: (getattr(recipe.weights, term) if value > 0 else 0.0)
               for term, value in row.weights.terms().items()}
    weights["ncc_window"] = recipe.weights.ncc_window
    variant = dataclasses.replace(row, name=f"{row.name}_recipe",
                                  weights=LossWeights(**weights),
                                  penalties=dataclasses.replace(recipe.penalties))
    validate(variant)
    return variant


def switched_off_by_recipe(row: ExperimentConfig, recipe: ExperimentConfig) -> List[str]:
    """Terms on in ``row`` that the recipe sets to 0 (so its recipe variant lacks them)."""
    return [term for term, value in row.weights.terms().items()
            if value > 0 and getattr(recipe.weights, term) == 0]


def ignored_recipe_settings(recipe: ExperimentConfig) -> List[str]:
    """The recipe's training settings that :func:`recipe_variant` does not carry over (only
    weights and penalties are), as ``"train.key=value"``; empty for a weights-only recipe."""
    reference = dataclasses.asdict(type(recipe.train)())
    return [f"train.{key}={value}" for key, value in dataclasses.asdict(recipe.train).items()
            if key not in _PROTOCOL_TRAIN_KEYS and value != reference[key]]


def resolve_recipe(path: Optional[Path]) -> Path:
    """``--recipe``: the given file (must exist), else :data:`DEFAULT_RECIPE`, else the
    stand-in :data:`STAND_IN_RECIPE` (said loudly)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"--recipe {path}: no such file")
        return path
    if DEFAULT_RECIPE.is_file():
        return DEFAULT_RECIPE
    print(f"NOTE: the tuned recipe {DEFAULT_RECIPE.relative_to(REPO_ROOT)} does not exist yet; "
          f"the recipe-weights rows use the stand-in "
          f"{STAND_IN_RECIPE.relative_to(REPO_ROOT)} (give another with --recipe PATH)")
    return STAND_IN_RECIPE


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


#: Where ``--smoke`` writes when no output folder is given (gitignored, like every run).
SMOKE_ROOT = REPO_ROOT / "runs" / "smoke"


def _shown(path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


class ExperimentParser(argparse.ArgumentParser):
    """An argument parser whose output folders (:meth:`add_output`) default to
    ``runs/smoke/<name>/<dest>`` under ``--smoke``, so that a pipeline check never writes into
    real runs or committed results; a folder given on the command line is used as it is."""

    def __init__(self, name: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.name = name
        self.output_defaults: Dict[str, Path] = {}

    def add_output(self, flag: str, default: Path, help: str):
        dest = flag.lstrip("-").replace("-", "_")
        self.output_defaults[dest] = Path(default)
        self.add_argument(flag, type=Path, default=None)
        self.describe_output(dest, help)

    def describe(self, dest: str, help: str) -> None:
        """Reword the help of the argument ``dest`` (one a shared builder made)."""
        next(action for action in self._actions if action.dest == dest).help = help

    def describe_output(self, dest: str, help: str) -> None:
        """:meth:`describe` for an output folder: its two defaults are appended."""
        self.describe(dest, f"{help} (default {_shown(self.output_defaults[dest])}; with "
                            f"--smoke {_shown(SMOKE_ROOT / self.name / dest)})")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        smoke = getattr(parsed, "smoke", False)
        for dest, default in self.output_defaults.items():
            if getattr(parsed, dest) is None:
                setattr(parsed, dest, SMOKE_ROOT / self.name / dest if smoke else default)
        return parsed


def build_parser(table: str, description: str, reuse_runs: bool = False,
                 recipe: bool = False, name: Optional[str] = None) -> ExperimentParser:
    """The arguments every table script shares; ``reuse_runs`` adds ``--runs ROW=RUN_DIR``,
    ``recipe`` adds ``--recipe PATH`` and ``--paper-only`` (Tables 1-2). ``name``: the
    script's, for its output folders (``runs/<name>``; default ``table``), where it is not
    the table whose rows it trains (Table 4 reads Table 5's)."""
    name = name or table
    parser = ExperimentParser(name, description=description)
    parser.add_output("--out", REPO_ROOT / "runs" / name,
                      "output folder: one run directory per row, the table, provenance")
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
        keys = "ROW or ROW@recipe" if recipe else "ROW"
        parser.add_argument("--runs", nargs="+", metavar="KEY=RUN_DIR", default=[],
                            help=f"reuse finished runs instead of training these rows (KEY: "
                                 f"{keys}); a run whose config differs from the row's in more "
                                 "than its name is used with a warning")
    if recipe:
        parser.add_argument("--recipe", type=Path, metavar="PATH",
                            help="YAML whose weights and penalties the second run of every row "
                                 f"uses (default {DEFAULT_RECIPE.relative_to(REPO_ROOT)}; until "
                                 f"it exists, {STAND_IN_RECIPE.relative_to(REPO_ROOT)})")
        parser.add_argument("--paper-only", action="store_true",
                            help="only the paper's weights (no recipe-weights rows)")
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


def parse_runs(items: Optional[Sequence[str]], table: str,
               suffixes: Sequence[str] = ()) -> Dict[str, Path]:
    """``["ltnet=runs/table2/ltnet", "gan_cyc@recipe=DIR"]`` -> {key: finished run to reuse};
    a key is a row of ``table``, or a row with one of ``suffixes`` (e.g. ``@recipe``)."""
    valid = [row + suffix for row in TABLE_ROWS[table] for suffix in ("", *suffixes)]
    runs = {}
    for item in items or ():
        key, sep, path = item.partition("=")
        if not sep or key not in valid:
            raise SystemExit(f"--runs expects KEY=RUN_DIR with KEY in {valid}; got {item!r}")
        runs[key] = Path(path)
    return runs


def config_differences(ours: ExperimentConfig, theirs: ExperimentConfig,
                       ignore: Sequence[str] = ("name",)) -> List[str]:
    """``"train.steps: 500 != 1000"`` for every setting (dotted key) in which two configs
    differ, except the keys in ``ignore``."""
    a, b = flat_config(ours), flat_config(theirs)
    return [f"{key}: {a.get(key)!r} != {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key) != b.get(key)]


def training_key(config: ExperimentConfig) -> str:
    """Equal for two configs that train the same network the same way: name and preset are
    labels, and the penalties only shape the cycle terms, so they do not count without them."""
    values = config_to_dict(config)
    values.pop("name")
    values.pop("preset")
    if not config.weights.needs_backward:
        values.pop("penalties")
    return json.dumps(values, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- training and scores

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
    weights and covers the held-out subjects. A table run writes ``scores_<preset>_<interp>``,
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
    """Train (or resume) one row and score its held-out subjects; a finished, scored run with
    the same config (up to its name) is read back from its score file instead."""
    from ltnet_keras.experiment import run_experiment
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
    from ltnet_keras.experiment import segment_and_score
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
    """The floor: the atlas labels scored against each held-out subject, no registration."""
    from ltnet_keras.experiment import no_registration_scores
    return no_registration_scores(config, atlas, list(config.data.val_subjects))


# ----------------------------------------------------------------------------- provenance

# write_provenance (provenance.json) lives in ltnet_keras.tables and is imported above.


# ----------------------------------------------------------------------------- running a table

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
    """The no-registration floor, once, from the first row's atlas and held-out subjects."""
    first = next(iter(configs))
    atlases = {key: run_atlas(d) for key, d in run_dirs.items()}
    held_out = {key: list(c.data.val_subjects) for key, c in configs.items()}
    if len(set(atlases.values())) > 1 or len({tuple(v) for v in held_out.values()}) > 1:
        print(f"WARNING: rows differ in atlas {atlases} or held-out subjects; the "
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


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _recipe_notes(table: str, recipe_path: Path, recipe: ExperimentConfig,
                  paper: Mapping[str, ExperimentConfig]) -> List[str]:
    weights = ", ".join(f"{k} {v:g}" for k, v in recipe.weights.terms().items())
    penalties = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(recipe.penalties).items())
    stand_in = (" (a stand-in: the tuned recipe "
                f"{_shown(DEFAULT_RECIPE)} did not exist when this table ran)"
                if Path(recipe_path).resolve() == STAND_IN_RECIPE.resolve() else "")
    notes = [f"Recipe weights: {_shown(recipe_path)}{stand_in}: weights {weights}; penalties "
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
              verbose: int = 2, recipe: Optional[Path] = None) -> TableResult:
    """Run every row of a table (resuming), then write ``<table>.md``, ``.csv``,
    ``_subjects.csv``, ``.png`` and ``provenance.json`` in ``out_root``: our rows next to the
    paper's, the no-registration floor and ``extra_rows`` (e.g. paper rows we do not reproduce).

    ``recipe``: a config whose weights and penalties give every row a second run
    (:func:`twin_configs`; keys ``ROW@recipe``, runs in ``<out>/recipe/ROW``); the table then
    shows a paper-weights and a recipe-weights block side by side.
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
        notes = _recipe_notes(table_name, recipe, recipe_config, paper) + notes
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
             f"{len(first.data.val_subjects)} held-out subjects, network grid "
             f"{first.data.network_shape}, steps {steps}")
    markdown = write_table(out_root, table_name, title, rows, notes)
    extra.update({"run_dirs": {key: str(d) for key, d in run_dirs.items()}, "reuse": reuse})
    write_provenance(out_root, table_name, configs, overrides, extra)
    return TableResult(configs, run_dirs, scores, baseline, markdown, rows, reuse)

