"""Table 3: one-atlas LT-Net against classical multi-atlas segmentation (Sec. 6.4).

The paper compares with MABMIS (tree-based groupwise registration + iterative groupwise
segmentation, Jia et al. 2012), which has no maintained implementation. The classical rows here
are the standard multi-atlas pipeline instead (ltnet_keras.baselines.multi_atlas): each atlas registered
to the validation scan with ANTs SyN, its labels warped onto the scan's 1 mm grid, and the k
warped label maps fused by joint label fusion (JLF, Wang et al. 2013) or by majority vote, on
the same registrations. The atlases are the LT-Net run's own atlas, then the next training
scans by similarity to the pool's average (the ranking that picks the single atlas), so 2, 3,
4, 5 atlases are prefixes of one list. Rows:

  * atlas labels without registration (the floor);
  * LT-Net with its one atlas (a finished run: --runs ltnet=DIR; else trained from
    configs/table3/ltnet.yaml);
  * ANTs SyN with 1 atlas (no fusion), SyN + JLF and SyN + majority vote with 2..5 atlases;
  * extra: the trained G_F as the registration of the same atlases + majority vote.

Every row has its seconds per case on this machine (one core): registrations of its k atlases
+ fusion (ANTs), k G_F segmentations + vote (G_F rows). The paper's MABMIS numbers (CANDI: not
comparable in absolute value) are shown beside the rows with the same number of atlases.
Registrations are kept in <out>/ants/registrations/ and finished rows are read back, so a
re-run, or a run with more atlases, redoes nothing already done.

    python experiments/table3_multi_atlas.py --runs ltnet=runs/table3/ltnet
    python experiments/table3_multi_atlas.py                 # trains the LT-Net row first
    python experiments/table3_multi_atlas.py --smoke --out /tmp/smoke/table3
"""
import dataclasses
from pathlib import Path


from common import (NO_REGISTRATION, PAPER_REFERENCE, build_parser,
                    collect_rows, config_paths, overrides_from_args, parse_runs, parse_set,
                    run_atlas, write_provenance)
from ltnet_keras.inference.fusion import FUSIONS, JointFusionSettings
from ltnet_keras.inference.refine import RefineSettings
from ltnet_keras.study.refine_sweep import set_threads
from ltnet_keras.baselines.multi_atlas import (SMOKE_SYN, SynSettings, ants_multi_atlas, ants_row_name,
                                     learned_multi_atlas, ranked_atlases)
from ltnet_keras.study.multi_atlas_table import Table3Row, write_outputs

TABLE = "table3"
# --smoke: two validation scans (SMOKE_OVERRIDES holds out one), so min/max/std mean something.
SMOKE_HELD_OUT = ["S13", "S14"]
FUSION_NAMES = {"majority": "majority vote", "jlf": "JLF"}
PAPER_TIMING = ("The paper: MABMIS ~14 min per case with 2 atlases on an Intel Core i3-4150 CPU; "
                "LT-Net ~4 s per case on a Tesla P40 GPU.")


def main(argv=None):
    parser = build_parser(TABLE, __doc__, reuse_runs=True)
    parser.add_argument("--atlases", nargs="+", type=int, default=[2, 3, 4, 5],
                        help="numbers of atlases k of the fused rows (default 2 3 4 5; the "
                             "1-atlas rows are always there)")
    parser.add_argument("--pairwise-run", type=Path, metavar="RUN_DIR",
                        help="a G_F trained with the atlases as moving images "
                             "(experiments/configs/multi_atlas/); adds its majority-vote rows")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a note to add under the table (e.g. how loaded the machine was)")
    parser.add_argument("--no-refine", action="store_true",
                        help="leave out the rows with test-time refinement of G_F's field")
    parser.add_argument("--syn-spacing", type=float,
                        help="voxel size (mm) of the SyN registration (default 3; 6 with --smoke)")
    parser.add_argument("--syn-iterations", type=int, nargs=3, metavar=("COARSE", "MID", "FINE"),
                        help="SyN iterations per level (default 100 70 50; 20 10 0 with --smoke)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for TensorFlow and ITK alike, so every row's seconds are "
                             "on the same footing (default 1)")
    args = parser.parse_args(argv)
    try:
        set_threads(args.threads)
    except RuntimeError:   # TensorFlow already running in this process (e.g. under pytest)
        print(f"NOTE: TensorFlow had started; --threads {args.threads} applies to ITK only")
    overrides = overrides_from_args(args)
    if args.smoke and "data.val_subjects" not in parse_set(args.set):
        overrides["data.val_subjects"] = SMOKE_HELD_OUT
    configs, run_dirs, scores, baseline = collect_rows(
        TABLE, config_paths(TABLE, ["ltnet"]), args.out, overrides,
        parse_runs(args.runs, TABLE), args.verbose)
    config, run_dir = configs["ltnet"], run_dirs["ltnet"]
    syn = SMOKE_SYN if args.smoke else SynSettings()
    syn = dataclasses.replace(syn, **{name: value for name, value in (
        ("spacing", args.syn_spacing), ("iterations", args.syn_iterations)) if value is not None})
    jlf = JointFusionSettings()

    atlases = ranked_atlases(config.data, run_atlas(run_dir), max([1, *args.atlases]))
    ks = sorted({k for k in args.atlases if 2 <= k <= len(atlases)})
    classical = ants_multi_atlas(config.data, atlases, [1, *ks], args.out / "ants", syn, jlf)
    learned = learned_multi_atlas(run_dir, config, [1, *ks], args.out / "ltnet_gf", atlases)
    # --smoke: two short levels, enough to check the rows end to end.
    refine = None if args.no_refine else (
        RefineSettings(levels=((8, 5), (4, 5))) if args.smoke else RefineSettings())
    refined = None if refine is None else learned_multi_atlas(
        run_dir, config, [1, *ks], args.out / "ltnet_gf", atlases, refine, FUSIONS, jlf)
    # A G_F trained with the same atlases as moving images (data.extra_atlases), beside the
    # one-atlas G_F's majority-vote rows (both without refinement).
    pairwise = None if args.pairwise_run is None else learned_multi_atlas(
        args.pairwise_run, config, [1, *ks], args.out / "pairwise_gf", atlases)

    def mabmis(k):
        return f"MABMIS, {k} atlases" if f"MABMIS, {k} atlases" in PAPER_REFERENCE[TABLE] else None

    def from_row(label, row, k, paper):
        return Table3Row(label, row.scores, paper, atlases=k, seconds=row.seconds_per_case,
                         seconds_by_subject=row.seconds)

    gf_one = learned.row("majority", 1)
    rows = [Table3Row(NO_REGISTRATION, baseline, None, "floor: affine pre-alignment only"),
            Table3Row("LT-Net (1 atlas)", scores["ltnet"], "LT-Net, 1 atlas",
                      seconds=gf_one.seconds_per_case, seconds_by_subject=gf_one.seconds),
            from_row("ANTs SyN (1 atlas)", classical[ants_row_name("single", 1)], 1, None)]
    rows += [from_row(f"ANTs SyN + JLF, {k} atlases", classical[ants_row_name("jlf", k)], k,
                      mabmis(k)) for k in ks]
    rows += [from_row(f"ANTs SyN + majority vote, {k} atlases",
                      classical[ants_row_name("majority", k)], k, mabmis(k)) for k in ks]
    rows += [from_row(f"LT-Net G_F + majority vote, {k} atlases (extra)",
                      learned.row("majority", k), k, mabmis(k)) for k in ks]
    if refined is not None:
        rows.append(from_row("LT-Net G_F + refine (1 atlas)", refined.row("majority", 1), 1,
                             None))
        rows += [from_row(f"LT-Net G_F + refine + {FUSION_NAMES[f]}, {k} atlases",
                          refined.row(f, k), k, mabmis(k)) for f in FUSIONS for k in ks]
    if pairwise is not None:
        rows += [from_row(f"G_F trained on {len(atlases)} atlases"
                          + (f" + majority vote, {k} atlases" if k > 1 else " (1 atlas)"),
                          pairwise.row("majority", k), k, mabmis(k)) for k in [1, *ks]]
    k_max = ks[-1] if ks else 1
    structure_rows = [NO_REGISTRATION, "LT-Net (1 atlas)", "ANTs SyN (1 atlas)"]
    if ks:
        structure_rows += [f"ANTs SyN + JLF, {k_max} atlases",
                           f"ANTs SyN + majority vote, {k_max} atlases"]
    if refined is not None:
        structure_rows += ["LT-Net G_F + refine (1 atlas)"] + (
            [f"LT-Net G_F + refine + JLF, {k_max} atlases"] if ks else [])

    notes = [
        "Not MABMIS: ANTs SyN registration of each atlas to the validation scan, then joint label "
        "fusion or majority vote of the warped labels (both on the same registrations). "
        f"Registration: {syn.describe()}. JLF: antsJointFusion, patch radius "
        f"{jlf.patch_radius}, search radius {jlf.search_radius}, beta {jlf.beta:g}, rho "
        f"{jlf.rho:g}, {jlf.metric} patches, on intensity-normalised images, fused where the "
        "warped atlases disagree (elsewhere they agree and JLF returns their label). Majority "
        "vote: ties to the atlas whose warped image correlates best with the scan, so with 2 "
        "atlases (no majority: every disagreement is a tie) it returns the better-correlated "
        "atlas' labels.",
        f"Atlases in order: {', '.join(atlases)} (the LT-Net run's atlas, then the training "
        "scans by similarity to the pool's average); k atlases = the first k.",
        "s/case: wall-clock seconds per validation scan on this machine (threads below): for the "
        "ANTs rows the k registrations (resampling, SyN, warping labels and image to 1 mm; "
        "timed when computed, also when read back from the cache) plus the fusion; for LT-Net "
        "its G_F segmentation of the scan (CPU, after one untimed call); for the G_F rows k such "
        "segmentations plus the vote. " + PAPER_TIMING,
        "The LT-Net G_F + majority vote rows are extra: G_F was trained with one atlas only, "
        "so the other atlases are outside its training distribution.",
    ]
    if refine is not None:
        notes.append(
            "G_F + refine: each atlas' G_F field refined on the scan before its labels are "
            "warped (ltnet_keras.inference.refine: "
            + ", ".join(f"{key} {value}" for key, value in refine.to_dict().items()) + "); "
            "s/case includes the network, the refinement, the label warp and the fusion.")
    if pairwise is not None:
        notes.append(
            f"G_F trained on {len(atlases)} atlases ({args.pairwise_run}): VoxelMorph's objective "
            "trained pairwise, each pair's moving image one of the atlases (data.extra_atlases; "
            "experiments/configs/multi_atlas/); beside the LT-Net G_F + majority vote rows, whose "
            "G_F saw only the first atlas. Neither is refined.")
    notes.append(f"Threads: {args.threads} for TensorFlow and ITK alike (--threads).")
    notes += args.note
    title = (f"Table 3: multi-atlas comparison — LT-Net run {run_dir}, atlas "
             f"{run_atlas(run_dir)}, {len(config.data.val_subjects)} validation subjects, network "
             f"grid {config.data.network_shape}, {config.train.steps} steps")
    markdown = write_outputs(args.out, title, rows, notes, structure_rows)
    write_provenance(args.out, TABLE, configs, overrides, {
        "run_dirs": {"ltnet": str(run_dir)}, "atlases": atlases, "ks": [1, *ks],
        "syn": syn.to_dict(), "jlf": jlf.to_dict(),
        "seconds_per_case": {row.label: row.seconds for row in rows},
        "seconds_per_scan_and_atlas_gf": learned.seconds_per_scan_and_atlas,
        "row_dirs": {"ants": str(args.out / "ants"), "ltnet_gf": str(args.out / "ltnet_gf"),
                     "pairwise_gf": str(args.out / "pairwise_gf")},
        "pairwise_run": None if args.pairwise_run is None else str(args.pairwise_run),
        "refine": None if refine is None else refine.to_dict(), "threads": args.threads})
    print(markdown)


if __name__ == "__main__":
    main()
