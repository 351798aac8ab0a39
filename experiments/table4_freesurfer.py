"""Table 4 on the paper's own label protocol (FreeSurfer's 28 aseg labels in its 16 structures).

The atlas is one of the five FreeSurfer subjects, chosen by the paper's rule (closest to the
average of the five once affinely aligned; written to <out>/atlas_choice.json); the other four
are the validation subjects. Training scans: LPBA40's 31 scans, unlabelled, aligned into the
atlas' space (configs in experiments/configs/freesurfer/). Each row's run is trained (or
resumed, or read back when finished) in --runs/<row>/, then every method segments the four
validation subjects in one process on --threads threads and is scored on each subject's own
grid: no registration, affine only, ANTs SyN, VoxelMorph, LT-Net (recipe) and G_F + refinement.

Writes in --out: table4_freesurfer.md / .csv, scores.json, atlas_choice.json, provenance.json,
and each run's small files (weights, config, history, records) in --out/<row>/.

    python experiments/table4_freesurfer.py --out results/freesurfer
    python experiments/table4_freesurfer.py --smoke --out /tmp/smoke/freesurfer
"""
import argparse
import time
from pathlib import Path

from common import REPO_ROOT, write_provenance
from ltnet_keras.config import load_config
from ltnet_keras.study.protocol_table import (choose_atlas, classical_rows, learned_rows,
                                              write_protocol_table)

CONFIGS = REPO_ROOT / "experiments" / "configs" / "freesurfer"
ROWS = {"voxelmorph": "VoxelMorph", "ltnet": "LT-Net (recipe)"}
LABELS = {"no_registration": "Atlas labels, no registration", "affine": "Affine only (ANTs)",
          "syn": "ANTs SyN, 1 atlas"}
SMOKE = {"train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 2,
         "data.crop_shape": [128, 128, 128], "data.factor": 8,
         "data.train_subjects": ["S01", "S11"], "data.val_subjects": ["sub-02"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "freesurfer")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "freesurfer",
                        help="where the rows train (checkpoints, aligned scans: not committed)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--refine-row", choices=sorted(ROWS), default="ltnet",
                        help="the run whose field test-time refinement starts from")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow and ITK threads while timing the methods")
    parser.add_argument("--train-only", action="store_true", help="train the rows, no table")
    parser.add_argument("--smoke", action="store_true",
                        help="2 steps on a coarse grid, one validation subject: checks the "
                             "pipeline, not a result")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every row (dotted keys)")
    args = parser.parse_args(argv)

    from ltnet_keras.baselines.syn import SMOKE_SYN
    from ltnet_keras.inference.refine import RefineSettings
    from ltnet_keras.study.arguments import overrides_from_args
    from ltnet_keras.study.refine_sweep import set_threads
    from ltnet_keras.study.table_run import install_run, train_and_score
    if not args.train_only:
        set_threads(args.threads)   # before TensorFlow starts: training rows run on it too
    overrides = overrides_from_args(args, SMOKE)
    configs = {row: load_config(CONFIGS / f"{row}.yaml", overrides) for row in args.rows}
    first = next(iter(configs.values()))
    atlas = choose_atlas(first.data.resolved_root(), args.out)
    for config in configs.values():
        if config.data.atlas != atlas:
            raise SystemExit(f"{CONFIGS}: data.atlas is {config.data.atlas}, the rule chose "
                             f"{atlas} ({args.out / 'atlas_choice.json'}): update the configs")
    for row, config in configs.items():
        train_and_score(config, args.runs / row)
    if args.train_only:
        return 0

    rows = classical_rows(first, args.runs / "classical_aligned",
                          SMOKE_SYN if args.smoke else None)
    refine = RefineSettings(levels=((8, 2),)) if args.smoke else RefineSettings()
    for row, config in configs.items():
        rows.update(learned_rows(args.runs / row, config, ROWS[row],
                                 refine if row == args.refine_row else None,
                                 out_dir=args.runs / row / "table_segmentations"))
    labels = {**LABELS, **{v: v for v in ROWS.values()}}
    notes = [f"Atlas {atlas} (the paper's rule: closest to the average of the five FreeSurfer "
             "subjects once aligned; atlas_choice.json); validation: the other four.",
             "Training scans: LPBA40's 31 scans without labels, aligned into the atlas' space "
             "by ANTs (affine); configs in experiments/configs/freesurfer/.",
             "Every method meets a subject through the same affine alignment and is scored on "
             "the subject's own grid over labels.tsv's 28 labels (other aseg ids: background).",
             f"Seconds: wall time per case on {args.threads} thread(s), alignment included, in "
             "one process (a process also pays ~20 s of compilation once, not counted).",
             "Paper rows: CANDI (103 scans, its own test split); not comparable in absolute "
             "value, same 16 structures."]
    title = (f"Table 4 on FreeSurfer's protocol: Dice (%) per structure, atlas {atlas}, "
             f"{len(first.data.val_subjects)} validation subjects" + (" (SMOKE)" * args.smoke))
    print(write_protocol_table(args.out, rows, labels, title, notes,
                               {"atlas": atlas, "threads": args.threads,
                                "generated": time.strftime("%Y-%m-%d %H:%M")}))
    for row in configs:
        install_run(args.runs / row, args.out / row)
    write_provenance(args.out, "table4_freesurfer", configs, overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
