"""Recipe variants of the paper's rows (Tables 1-2 run every row with the paper's weights and
with a recipe's), and how two experiment configs are compared (what differs, whether they
train the same network)."""
import dataclasses
import json
from typing import List, Sequence

from ltnet_keras.config import ExperimentConfig, LossWeights, config_to_dict, flat_config, validate

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
