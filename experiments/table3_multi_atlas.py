"""Table 3: one-atlas LT-Net against multi-atlas segmentation with 1..5 atlases (Sec. 6.4).

NOT MABMIS. The paper compares with MABMIS (tree-based groupwise registration + iterative
groupwise segmentation), which we do not have. This script implements majority-vote multi-atlas
segmentation with the LEARNED registration instead: the top-k training scans (the run's own
atlas first, then by similarity to the pool's average, as select_atlas ranks them) are each
passed to the trained LT-Net G_F as the moving image, their labels are warped onto each held-out
scan, and the k warped label maps are fused by per-voxel majority vote (ties: the atlas whose
warped image correlates best with the scan). k = 1 is plain LT-Net. For k > 1 it uses k labelled
scans, i.e. leaves the one-shot setting, as any multi-atlas method does; G_F was trained with one
atlas only, so the other atlases are out of its training distribution.

The paper's MABMIS numbers are shown beside the rows with the same number of atlases
(CANDI: not comparable in absolute value).

    python experiments/table3_multi_atlas.py                          # trains LT-Net first
    python experiments/table3_multi_atlas.py --runs ltnet=runs/table2/ltnet
    python experiments/table3_multi_atlas.py --smoke --atlases 1 2
"""
from common import (NO_REGISTRATION, Row, build_parser, collect_rows, config_paths,
                    multi_atlas_scores, overrides_from_args, parse_runs, write_provenance,
                    write_table)

TABLE = "table3"
NOTE = ("Not MABMIS: majority-vote multi-atlas segmentation with the trained LT-Net G_F as the "
        "registration (top-k training scans as atlases; k = 1 is plain LT-Net). The paper's "
        "MABMIS rows are shown beside the rows with the same number of atlases.")


def main(argv=None):
    parser = build_parser(TABLE, __doc__, reuse_runs=True)
    parser.add_argument("--atlases", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                        help="numbers of atlases k to fuse (default 1 2 3 4 5)")
    args = parser.parse_args(argv)
    overrides = overrides_from_args(args)
    configs, run_dirs, _, baseline = collect_rows(
        TABLE, config_paths(TABLE, ["ltnet"]), args.out, overrides,
        parse_runs(args.runs, TABLE), args.verbose)
    config, run_dir = configs["ltnet"], run_dirs["ltnet"]
    scores, atlases, seconds = multi_atlas_scores(run_dir, config, args.atlases,
                                                  out_dir=args.out / "multi_atlas")
    rows = [Row(NO_REGISTRATION, baseline, note="floor: affine pre-alignment only")]
    for k, k_scores in scores.items():
        paper = "LT-Net, 1 atlas" if k == 1 else f"MABMIS, {k} atlases"
        label = ("LT-Net (1 atlas)" if k == 1
                 else f"LT-Net G_F + majority vote, {k} atlases")
        rows.append(Row(label, k_scores, paper))
    notes = [NOTE, f"Atlases in order: {', '.join(atlases)}; {seconds:.1f} s per scan and atlas "
                   "(G_F + label warp on this machine's CPU)."]
    markdown = write_table(args.out, TABLE, f"Table 3: multi-atlas comparison — run {run_dir}, "
                           f"{len(config.data.val_subjects)} held-out subjects", rows, notes)
    write_provenance(args.out, TABLE, configs, overrides,
                     {"run_dirs": {"ltnet": str(run_dir)}, "atlases": atlases,
                      "ks": list(scores), "seconds_per_scan_and_atlas": seconds})
    print(markdown)


if __name__ == "__main__":
    main()
