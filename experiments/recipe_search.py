"""Issue 6's recipe search: when does LT-Net's cycle supervision help?

One YAML per setting under experiments/configs/recipe/ (same grid, atlas, seed and step budget;
each file's first line says which family it belongs to and what it tests). Every setting trains
in <runs>/<setting>/ (resuming if interrupted), is scored on the validation subjects S31-S40,
and lands in <out>/<setting>/ (config, versions, history with the gradient-norm diagnostics,
curves, per-subject scores, row.json); <out>/table.md, table.csv and dice.png collect them,
each row against the VoxelMorph twin of the same G_F budget. Finished settings are read back.

    python experiments/recipe_search.py                               # every setting, in order
    python experiments/recipe_search.py --settings 00_vm_twin_500 02_paper
    python experiments/recipe_search.py --smoke      # pipeline check, in runs/smoke/recipe_search
"""

from common import (CONFIG_DIR, REPO_ROOT, SMOKE_OVERRIDES, ExperimentParser, parse_set,
                    write_provenance)

from ltnet_keras.config import load_config
from ltnet_keras.study.search import run_search

RECIPE_DIR = CONFIG_DIR / "recipe"
NOTES = (
    "LPBA40, network grid 32x48x32 (crop 128x192x128, factor 4), atlas auto (S13), S11-S30 "
    "unlabelled for training, scored on S31-S40 (the validation subjects; nothing else is used "
    "to select). Dice: mean over the 28 merged structures per subject, then mean (std) over "
    "subjects, labels warped with the linear one-hot vote at full resolution. 'vs twin': Dice "
    "minus that of the VoxelMorph preset (sim + 1 smooth) with the same number of G_F updates. "
    "field: mean displacement (network voxels) at the end of training; fold %: voxels with "
    "det J <= 0 of the network-grid forward field, mean over subjects; D loss: the "
    "discriminator's LSGAN loss over the last log block; weakest term / sim: the active term "
    "whose gradient w.r.t. the forward field (weighted, on a fixed training pair, last log "
    "step) is smallest, as a fraction of L_sim's. One seed (0); differences of ~1 point are "
    "within seed noise until repeated.")


def main(argv=None):
    parser = ExperimentParser("recipe_search", description=__doc__)
    parser.add_argument("--settings", nargs="+", metavar="STEM",
                        help="YAML stems under experiments/configs/recipe (default: all, in order)")
    parser.add_output("--runs", REPO_ROOT / "runs" / "recipe_search",
                      "run directories (checkpoints; not committed)")
    parser.add_output("--out", REPO_ROOT / "results" / "recipe_search",
                      "the table and each setting's small artefacts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every setting, e.g. --set train.steps=100")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny subject set and 10 steps: checks the pipeline only")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)

    available = sorted(RECIPE_DIR.glob("*.yaml"))
    stems = args.settings or [p.stem for p in available]
    unknown = sorted(set(stems) - {p.stem for p in available})
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; valid: {[p.stem for p in available]}")
    paths = [RECIPE_DIR / f"{stem}.yaml" for stem in stems]
    overrides = dict(SMOKE_OVERRIDES, **{"train.log_every": 10}) if args.smoke else {}
    overrides.update(parse_set(args.set))
    write_provenance(args.out, "recipe_search",
                     {p.stem: load_config(p, dict(overrides)) for p in paths}, overrides)
    rows = run_search(paths, args.runs, args.out, overrides, title="LT-Net recipe search "
                      "(issue 6)", notes=NOTES, verbose=args.verbose)
    print((args.out / "table.md").read_text())
    return rows


if __name__ == "__main__":
    main()
