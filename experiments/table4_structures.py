"""Table 4: Dice of each brain structure for VoxelMorph and LT-Net (Sec. 6.5).

Takes finished runs (--runs voxelmorph=DIR ltnet=DIR, e.g. from Tables 1-2; their per-subject
scores_<preset>_<interp>.csv are read back when present) or trains the rows of
experiments/configs/table4/. Writes <out>/table4.md / .csv: one line per merged LPBA40 structure,
mean (std) over the held-out subjects per method, with the no-registration floor. The paper's
Table 4 is on CANDI's 16 structures; only caudate, putamen, hippocampus and brain stem exist in
both protocols and are shown side by side (CANDI numbers: not comparable in absolute value).
DataAug and the supervised U-Net columns of the paper are not reproduced.

    python experiments/table4_structures.py --runs voxelmorph=runs/table1/voxelmorph \\
        ltnet=runs/table2/ltnet
    python experiments/table4_structures.py --smoke
"""
from common import (NO_REGISTRATION, TABLE_ROWS, build_parser, collect_rows, config_paths,
                    overrides_from_args, parse_runs, write_provenance, write_structure_table)

TABLE = "table4"
NOTE = ("DataAug and the fully supervised U-Net columns of the paper's Table 4 are not "
        "reproduced (no such models in the package).")


def main(argv=None):
    parser = build_parser(TABLE, __doc__, reuse_runs=True)
    args = parser.parse_args(argv)
    overrides = overrides_from_args(args)
    configs, run_dirs, scores, baseline = collect_rows(
        TABLE, config_paths(TABLE, args.rows), args.out, overrides, parse_runs(args.runs, TABLE),
        args.verbose)
    results = {NO_REGISTRATION: baseline}
    paper_rows = {}
    for row, row_scores in scores.items():
        label, paper = TABLE_ROWS[TABLE][row]
        results[label] = row_scores
        paper_rows[label] = paper
    markdown = write_structure_table(args.out, TABLE, "Table 4: Dice per structure", results,
                                     paper_rows, [NOTE])
    write_provenance(args.out, TABLE, configs, overrides,
                     {"run_dirs": {r: str(d) for r, d in run_dirs.items()}})
    print(markdown)


if __name__ == "__main__":
    main()
