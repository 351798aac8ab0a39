"""What the table scripts share: where configs and outputs live, the shared arguments, and the
package's study machinery (:mod:`ltnet_keras.study`) bound to this repository's folders.

Each table script (``table1_forward_backward.py`` ... ``table5_sota.py``) parses its arguments
with :func:`build_parser`, loads one YAML per row from ``experiments/configs/<table>/`` and calls
:func:`run_table` (:func:`ltnet_keras.study.table_run.run_table`). A row's run lives in
``<out>/<row>/``; ``--runs ROW=DIR`` reuses a finished run instead. Tables 1 and 2 run each row
twice: with the paper's weights and with a recipe's (runs in ``<out>/recipe/<row>/``, keys
``ROW@recipe``).
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras._compat import start_tensorflow_quietly

# A table script's terminal shows progress and results, not TensorFlow's C++ start-up log.
start_tensorflow_quietly()
from ltnet_keras.study import arguments, table_run
from ltnet_keras.study.arguments import parse_set  # noqa: F401
from ltnet_keras.study.recipe import (RECIPE_SUFFIX, config_differences,  # noqa: F401
                                      ignored_recipe_settings, recipe_variant,
                                      switched_off_by_recipe, training_key)
from ltnet_keras.study.table_run import (NO_REGISTRATION, TABLE_ROWS, _current_scores,  # noqa: F401
                                         baseline_scores, collect_rows, load_rows, run_atlas,
                                         run_dir_for, score_existing_run, train_and_score,
                                         twin_configs)
from ltnet_keras.study.tables import (PAPER_NOTE, PAPER_REFERENCE, PAPER_TABLE4,  # noqa: F401
                                      SHARED_STRUCTURES, Row, format_markdown_table,
                                      write_provenance, write_structure_table, write_table)
from ltnet_keras.inference.fusion import majority_vote  # noqa: F401
from ltnet_keras.baselines.multi_atlas import learned_multi_atlas as multi_atlas_scores  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Where ``--smoke`` writes when no output folder is given (gitignored, like every run).
SMOKE_ROOT = REPO_ROOT / "runs" / "smoke"


class ExperimentParser(arguments.ExperimentParser):
    """:class:`ltnet_keras.study.arguments.ExperimentParser` writing ``--smoke`` runs under
    ``runs/smoke/`` of this repository."""

    def __init__(self, name: str, **kwargs):
        super().__init__(name, SMOKE_ROOT, REPO_ROOT, **kwargs)

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

# The tuned recipe the lead writes; until it exists, a finished recipe-search setting stands in.
DEFAULT_RECIPE = CONFIG_DIR / "ltnet_tuned.yaml"
STAND_IN_RECIPE = CONFIG_DIR / "recipe" / "06_group_0.1_0.03.yaml"


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


def config_paths(table: str, rows: Optional[Sequence[str]] = None) -> List[Path]:
    """The YAML of each row of ``table`` (all rows, in the paper's order, unless ``rows``)."""
    known = list(TABLE_ROWS[table])
    rows = list(rows) if rows else known
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SystemExit(f"{table}: unknown rows {unknown}; valid: {known}")
    return [CONFIG_DIR / table / f"{row}.yaml" for row in rows]


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
                        help="tiny grid, 2 training subjects, 1 validation, 10 steps: checks the "
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
    return arguments.overrides_from_args(args, SMOKE_OVERRIDES)


def parse_runs(items: Optional[Sequence[str]], table: str,
               suffixes: Sequence[str] = ()) -> Dict[str, Path]:
    """``["ltnet=runs/table2/ltnet", "gan_cyc@recipe=DIR"]`` -> {key: finished run to reuse}."""
    return arguments.parse_runs(items, list(TABLE_ROWS[table]), suffixes)


def run_table(table_name: str, config_paths: Sequence[Path], out_root,
              overrides: Optional[dict] = None, **kwargs):
    """:func:`ltnet_keras.study.table_run.run_table` with this repository's paths in its notes."""
    recipe = kwargs.get("recipe")
    if recipe is not None and Path(recipe).resolve() == STAND_IN_RECIPE.resolve():
        kwargs.setdefault("recipe_stands_in_for", DEFAULT_RECIPE)
    kwargs.setdefault("root", REPO_ROOT)
    return table_run.run_table(table_name, config_paths, out_root, overrides, **kwargs)
