"""Table 5: LT-Net against VoxelMorph, DataAug and a fully supervised U-Net (Sec. 6.5).

Reproduced: VoxelMorph and LT-Net (experiments/configs/table5/, or finished runs given with
--runs, e.g. from Tables 1-2), plus the floor "atlas labels, no registration".
NOT reproduced: DataAug (Zhao et al., CVPR 2019) and the fully supervised U-Net upper bound,
which would need a segmentation network trained on labels; the package has none. Their rows
show the paper's CANDI numbers only, with no number of ours.

    python experiments/table5_sota.py
    python experiments/table5_sota.py --runs voxelmorph=runs/table1/voxelmorph \\
        ltnet=runs/table2/ltnet
    python experiments/table5_sota.py --smoke
"""
from common import (Row, build_parser, config_paths, overrides_from_args, parse_runs,
                    run_table)

TABLE = "table5"
NOT_REPRODUCED = ("DataAug and the fully supervised U-Net (upper bound) are NOT reproduced: the "
                  "package has no segmentation network trained on labels. Their lines show the "
                  "paper's numbers only.")


def main(argv=None):
    parser = build_parser(TABLE, __doc__, reuse_runs=True)
    args = parser.parse_args(argv)
    runs = parse_runs(args.runs, TABLE)
    extra = [Row("DataAug", None, "DataAug", "not reproduced"),
             Row("U-Net (upper bound)", None, "U-Net (upper bound)", "not reproduced")]
    print(NOT_REPRODUCED)
    result = run_table(TABLE, config_paths(TABLE, args.rows), args.out, overrides_from_args(args),
                       runs=runs, extra_rows=extra, notes=[NOT_REPRODUCED],
                       title="Table 5: comparison with other methods", verbose=args.verbose)
    print(result.markdown)
    print(NOT_REPRODUCED)


if __name__ == "__main__":
    main()
