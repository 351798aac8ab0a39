"""Table 1: effectiveness of forward-backward consistency (Sec. 6.2).

Rows: VoxelMorph (L_sim + L_smooth), + L_GAN, + L_GAN + L_cyc; one YAML each in
experiments/configs/table1/ (the recipe-search protocol: grid 32x48x32, atlas auto, S11-S30
unlabelled, S31-S40 for validation, seed 0, 500 steps). Every row with LT-Net terms runs twice: with
the paper's weights (<out>/<row>/) and with the recipe's (--recipe, <out>/recipe/<row>/; the
terms the row switches off stay off). VoxelMorph and the no-registration floor are shared. Each
run's G_F segments the validation subjects (atlas labels warped, Eq. 2); <out>/table1.md, .csv,
_subjects.csv, .png and provenance.json compare the rows with the paper's CANDI numbers.

    python experiments/table1_forward_backward.py                 # every row, both weight sets
    python experiments/table1_forward_backward.py --smoke         # end-to-end check, minutes
    python experiments/table1_forward_backward.py \\
        --runs voxelmorph=runs/recipe_search/vm_twin_500          # reuse a finished run
    python experiments/table1_forward_backward.py --paper-only --rows voxelmorph gan
"""
from common import (RECIPE_SUFFIX, build_parser, config_paths, overrides_from_args, parse_runs,
                    resolve_recipe, run_table)

TABLE = "table1"


def main(argv=None):
    args = build_parser(TABLE, __doc__, reuse_runs=True, recipe=True).parse_args(argv)
    recipe = None if args.paper_only else resolve_recipe(args.recipe)
    result = run_table(TABLE, config_paths(TABLE, args.rows), args.out, overrides_from_args(args),
                       runs=parse_runs(args.runs, TABLE, (RECIPE_SUFFIX,)),
                       title="Table 1: forward-backward consistency", verbose=args.verbose,
                       recipe=recipe)
    print(result.markdown)
    return result


if __name__ == "__main__":
    main()
