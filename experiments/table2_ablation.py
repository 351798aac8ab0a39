"""Table 2: ablation of the new supervision signals (Sec. 6.3).

Rows: the baseline (+ L_GAN + L_cyc), + L_trans, + L_anatomy_cyc, + L_trans + L_anatomy_cyc, and
the full LT-Net (+ L_diff_cyc); one YAML each in experiments/configs/table2/. Each row trains in
<out>/<row>/ (resuming if interrupted) and is scored on the held-out subjects; <out>/table2.md /
.csv compare the rows with the paper's CANDI numbers and the no-registration floor.

    python experiments/table2_ablation.py                         # the full protocol (long)
    python experiments/table2_ablation.py --smoke --rows gan_cyc ltnet
"""
from common import build_parser, config_paths, overrides_from_args, run_table

TABLE = "table2"


def main(argv=None):
    args = build_parser(TABLE, __doc__).parse_args(argv)
    result = run_table(TABLE, config_paths(TABLE, args.rows), args.out, overrides_from_args(args),
                       title="Table 2: ablation of the supervision signals", verbose=args.verbose)
    print(result.markdown)


if __name__ == "__main__":
    main()
