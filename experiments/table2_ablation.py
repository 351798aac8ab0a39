"""Table 2: ablation of the new supervision signals (Sec. 6.3).

Rows: the baseline (+ L_GAN + L_cyc), + L_trans, + L_anatomy_cyc, + L_trans + L_anatomy_cyc, and
the full LT-Net (+ L_diff_cyc); one YAML each in experiments/configs/table2/ (the recipe-search
protocol: grid 32x48x32, atlas auto, S11-S30 unlabelled, S31-S40 for validation, seed 0, 500 steps).
Every row runs twice: with the paper's weights (<out>/<row>/) and with the recipe's (--recipe,
<out>/recipe/<row>/; the terms the row switches off stay off). Each run is scored on the
validation subjects; <out>/table2.md, .csv, _subjects.csv, .png and provenance.json compare the
rows with the paper's CANDI numbers and the no-registration floor.

    python experiments/table2_ablation.py                         # every row, both weight sets
    python experiments/table2_ablation.py --runs ltnet=runs/recipe_search/paper \\
        gan_cyc=runs/table1/gan_cyc gan_cyc@recipe=runs/table1/recipe/gan_cyc
    python experiments/table2_ablation.py --smoke --rows gan_cyc ltnet
"""
from common import (RECIPE_SUFFIX, build_parser, config_paths, overrides_from_args, parse_runs,
                    resolve_recipe, run_table)

TABLE = "table2"


def main(argv=None):
    args = build_parser(TABLE, __doc__, reuse_runs=True, recipe=True).parse_args(argv)
    recipe = None if args.paper_only else resolve_recipe(args.recipe)
    result = run_table(TABLE, config_paths(TABLE, args.rows), args.out, overrides_from_args(args),
                       runs=parse_runs(args.runs, TABLE, (RECIPE_SUFFIX,)),
                       title="Table 2: ablation of the supervision signals",
                       verbose=args.verbose, recipe=recipe)
    print(result.markdown)
    return result


if __name__ == "__main__":
    main()
