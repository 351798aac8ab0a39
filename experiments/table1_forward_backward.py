"""Table 1: effectiveness of forward-backward consistency (Sec. 6.2).

Rows: VoxelMorph (L_sim + L_smooth), + L_GAN, + L_GAN + L_cyc; one YAML each in
experiments/configs/table1/. Each row trains in <out>/<row>/ (resuming if interrupted), its G_F
segments the held-out subjects (atlas labels warped, Eq. 2), and <out>/table1.md / .csv compare
the rows with the paper's CANDI numbers and the no-registration floor.

    python experiments/table1_forward_backward.py                 # the full protocol (long)
    python experiments/table1_forward_backward.py --smoke         # end-to-end check, minutes
    python experiments/table1_forward_backward.py --rows voxelmorph gan --steps 500
"""
from common import build_parser, config_paths, overrides_from_args, run_table

TABLE = "table1"


def main(argv=None):
    args = build_parser(TABLE, __doc__).parse_args(argv)
    result = run_table(TABLE, config_paths(TABLE, args.rows), args.out, overrides_from_args(args),
                       title="Table 1: forward-backward consistency", verbose=args.verbose)
    print(result.markdown)


if __name__ == "__main__":
    main()
