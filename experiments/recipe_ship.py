"""Issue 6, step 3: train the recipe chosen by the search at a larger budget, with its VoxelMorph
twin, for several seeds, and check the issue's criteria on the validation subjects S31-S40.

For each seed, the recipe (``--recipe``, default experiments/configs/ltnet_tuned.yaml) and the
VoxelMorph twin (``--twin``: the search's twin YAML) are trained with the same grid, atlas, seed
and step budget (``--steps``, default 1500 = 3x the search's 500), each scored like a search row.
Seed 0's run directories land at ``<out>/ltnet/`` and ``<out>/voxelmorph/``, other seeds' at
``<out>/seed<k>/{ltnet,voxelmorph}/``: config, versions, history (with the gradient-norm
diagnostics), curves, scores and ``forward_generator.h5``, so ``ltnet segment --run`` works on
them. ``<out>/results.md`` / ``criteria.json`` say, per seed, whether the recipe beats its twin
by >= 1.0 Dice point, folds no more voxels, and keeps every active term's pull on the forward
field >= 5% of L_sim's at the end of training.

    python experiments/recipe_ship.py                      # seeds 0 and 1, 1500 steps
    python experiments/recipe_ship.py --smoke        # pipeline check, in runs/smoke/recipe_ship
"""
import dataclasses
import json
import shutil
from pathlib import Path

from common import (CONFIG_DIR, REPO_ROOT, SMOKE_OVERRIDES, ExperimentParser, parse_set,
                    write_provenance)

from ltnet_keras.config import load_config
from ltnet_keras.records import atomic_write_text
from ltnet_keras.study.search import final_history_row, run_setting, term_pulls
from ltnet_keras.training import BACKWARD_WEIGHTS, FORWARD_WEIGHTS

#: The issue's bars for the shipped recipe.
MIN_GAIN = 1.0          # Dice points over the twin, every seed
MIN_PULL = 0.05         # each active term's gradient norm w.r.t. the field, as a share of sim's


def check_seed(ltnet: dict, twin: dict, pulls: dict) -> dict:
    """The issue's three criteria for one seed (``ltnet``/``twin``: search rows)."""
    gain = ltnet["dice_mean"] - twin["dice_mean"]
    weakest = min(pulls.values()) if pulls else float("nan")
    return {"ltnet_dice": ltnet["dice_mean"], "twin_dice": twin["dice_mean"], "gain": gain,
            "ltnet_folding_percent": ltnet["folding_percent"],
            "twin_folding_percent": twin["folding_percent"], "pulls": pulls,
            "beats_twin_by_1": gain >= MIN_GAIN,
            "folds_no_more": ltnet["folding_percent"] <= twin["folding_percent"],
            "every_term_pulls_5pct": bool(pulls) and weakest >= MIN_PULL}


def _results_dir(out: Path, seed: int, role: str) -> Path:
    return out / role if seed == 0 else out / f"seed{seed}" / role


def format_results(recipe_name: str, steps: int, subjects, checks: dict) -> str:
    lines = [f"# Shipped recipe `{recipe_name}` against its VoxelMorph twin ({steps} steps)", "",
             f"Validation subjects {', '.join(subjects)}; Dice (%) = mean over the merged "
             "structures per subject, then mean over subjects. Pull = a term's gradient norm "
             "w.r.t. the forward field over L_sim's (fixed training pair, last log step).", "",
             "| seed | LT-Net | VoxelMorph | gain | fold % LT-Net / VM | weakest pull | "
             "gain >= 1.0 | folds no more | every pull >= 5% |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, c in checks.items():
        weakest = min(c["pulls"].items(), key=lambda kv: kv[1]) if c["pulls"] else ("-", float("nan"))
        lines.append(
            f"| {seed} | {c['ltnet_dice']:.2f} | {c['twin_dice']:.2f} | {c['gain']:+.2f} | "
            f"{c['ltnet_folding_percent']:.3f} / {c['twin_folding_percent']:.3f} | "
            f"{weakest[0]} {weakest[1]:.3f} | {'yes' if c['beats_twin_by_1'] else 'NO'} | "
            f"{'yes' if c['folds_no_more'] else 'NO'} | "
            f"{'yes' if c['every_term_pulls_5pct'] else 'NO'} |")
    lines += ["", "Pull of every active term at the end of training:", ""]
    for seed, c in checks.items():
        lines.append(f"- seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                   sorted(c["pulls"].items())))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = ExperimentParser("recipe_ship", description=__doc__)
    parser.add_argument("--recipe", type=Path, default=CONFIG_DIR / "ltnet_tuned.yaml")
    parser.add_argument("--twin", type=Path, default=CONFIG_DIR / "recipe" / "00_vm_twin_500.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_output("--runs", REPO_ROOT / "runs" / "recipe", "run directories (not committed)")
    parser.add_output("--out", REPO_ROOT / "results" / "recipe",
                      "the criteria, results and each run's small artefacts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true", help="tiny pipeline check only")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)

    overrides = dict(SMOKE_OVERRIDES) if args.smoke else {"train.steps": args.steps}
    overrides.update(parse_set(args.set))
    checks, configs = {}, {}
    for seed in args.seeds:
        rows = {}
        for role, path in (("voxelmorph", args.twin), ("ltnet", args.recipe)):
            config = load_config(path, dict(overrides, **{"train.seed": seed}))
            config = dataclasses.replace(config, name=role)
            configs[f"{role}_seed{seed}"] = config
            run_dir = args.runs / f"seed{seed}" / role
            results_dir = _results_dir(args.out, seed, role)
            rows[role] = run_setting(config, run_dir, results_dir, verbose=args.verbose)
            # segment --run needs G_F (the search keeps it for twins only); Fig. 3 needs G_B.
            for weights in (FORWARD_WEIGHTS, BACKWARD_WEIGHTS):
                if (run_dir / weights).exists():
                    shutil.copy2(run_dir / weights, results_dir / weights)
        final = final_history_row(args.runs / f"seed{seed}" / "ltnet")
        checks[seed] = check_seed(rows["ltnet"], rows["voxelmorph"], term_pulls(final))
    recipe_name = load_config(args.recipe).name
    atomic_write_text(args.out / "criteria.json", json.dumps(checks, indent=2))
    first = configs[next(iter(configs))]
    text = format_results(recipe_name, first.train.steps, first.data.val_subjects, checks)
    atomic_write_text(args.out / "results.md", text)
    write_provenance(args.out, "recipe_ship", configs, overrides)
    print(text)


if __name__ == "__main__":
    main()
