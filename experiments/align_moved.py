"""Does `ltnet segment --align affine` undo a move in the scanner? Validation LPBA40 scans moved
(<= 10 deg, <= 10 mm, 0.95-1.05 size; seed kept) and stored as FreeSurfer stores them
(256^3, 1 mm, LIA, .mgz), segmented with a trained run and scored against their moved labels
on the moved grid, beside the same scans segmented in place.

    python experiments/align_moved.py --run results/demo_voxelmorph_1000 --seed 0 \\
        --work /tmp/align_moved --out results/align_moved

Four rows per subject: unmoved scans in place (``--align none``, what the run was evaluated
with), unmoved scans aligned (``--align affine``), moved scans without alignment (the old
behaviour) and moved scans aligned. Writes ``OUT/results.md``, ``OUT/scores_<row>.csv``,
``OUT/seconds.csv`` (seconds per stage of every aligned moved case) and
``OUT/provenance.json`` (seed, moves, registration settings, versions). The moved scans and
all label maps stay in ``--work`` (outside the repository: they are MRI data).
"""
import argparse
import os
import sys
from pathlib import Path

# One ITK thread makes the ANTs registration bit-for-bit reproducible; it must be set before
# ANTs loads (--itk-threads overrides it: see parse_args below).
if __name__ == "__main__":
    for i, arg in enumerate(sys.argv):
        if arg == "--itk-threads" and i + 1 < len(sys.argv):
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = sys.argv[i + 1]
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

import ltnet_keras  # noqa: E402,F401
from ltnet_keras import evaluation  # noqa: E402
from ltnet_keras.data.dataset import subject_files  # noqa: E402
from ltnet_keras.data.io import load_label_map  # noqa: E402
from ltnet_keras.data.labels import LabelTable  # noqa: E402
from ltnet_keras.records import atomic_write_text, csv_text  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import moved_scans  # noqa: E402
from common import write_provenance  # noqa: E402

ROWS = {"unmoved_in_place": ("unmoved", "none"), "unmoved_aligned": ("unmoved", "affine"),
        "moved_not_aligned": ("moved", "none"), "moved_aligned": ("moved", "affine")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=HERE.parent / "results"
                        / "demo_voxelmorph_1000")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moves")
    parser.add_argument("--subjects", nargs="*", default=moved_scans.DEFAULT_SUBJECTS)
    parser.add_argument("--work", type=Path, required=True,
                        help="moved scans and segmentations (outside the repository)")
    parser.add_argument("--out", type=Path, required=True, help="results (numbers only)")
    parser.add_argument("--rows", nargs="*", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--itk-threads", type=int, default=1,
                        help="ITK threads for ANTs (1: reproducible bit for bit)")
    return parser.parse_args(argv)


def make_moved(args) -> dict:
    """The moved copies in ``work/moved`` (made once per seed), and their moves."""
    moved = args.work / "moved"
    record = moved / "moves.json"
    if record.exists() and json.loads(record.read_text()).get("seed") == args.seed:
        recorded = json.loads(record.read_text())
        if set(args.subjects) <= set(recorded["moves"]):
            return recorded
    moved_scans.main(["--seed", str(args.seed), "--out", str(moved), "--subjects",
                      *args.subjects])
    return json.loads(record.read_text())


def main(argv=None):
    from ltnet_keras.inference.segment import Segmenter
    args = parse_args(argv)
    load_before = os.getloadavg()
    moves = make_moved(args)
    segmenters = {}
    config = None
    results, seconds = {}, []
    for row in args.rows:
        which, align = ROWS[row]
        if align not in segmenters:
            segmenters[align] = Segmenter(args.run, align=align)
        segmenter = segmenters[align]
        config = segmenter.config
        table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
        files = {f.id: f for f in subject_files(config.data, args.subjects)}
        scores = []
        for sid in args.subjects:
            if which == "moved":
                image = args.work / "moved" / "images" / f"{sid}.mgz"
                truth = args.work / "moved" / "labels" / f"{sid}.mgz"
            else:
                image, truth = files[sid].image, files[sid].label
            result = segmenter.segment_to_files(image, args.work / "segmentations" / row)
            score = evaluation.evaluate_pair(result.labels, load_label_map(truth).array, table,
                                             sid)
            scores.append(score)
            total = sum(result.seconds.values())
            print(f"{row:18s} {sid}: Dice {100 * score.mean_structure:5.1f}  "
                  f"{total:5.2f} s  " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                 result.seconds.items()), flush=True)
            if row == "moved_aligned":
                seconds.append({"subject": sid, **result.seconds, "total": total})
        results[row] = scores
        evaluation.write_scores_csv(scores, args.out / f"scores_{row}.csv")
    load = {"before": load_before, "after": os.getloadavg()}
    write_report(args, results, seconds, moves, load)
    registration = dataclasses.asdict(segmenters["affine"].registration) \
        if "affine" in segmenters else None
    write_provenance(args.out, "align_moved", {"run": config}, extra={
        "run_dir": str(args.run), "move_seed": args.seed, "moves": moves,
        "registration": registration, "itk_threads": os.environ.get(
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"), "label_interp": config.segment.label_interp,
        "load_average_1_5_15_min": load})
    return 0


def write_report(args, results, seconds, moves, load):
    args.out.mkdir(parents=True, exist_ok=True)
    rows = list(results)
    per_subject = ["| subject | move | " + " | ".join(rows) + " |",
                   "|---|---|" + "---:|" * len(rows)]
    for i, sid in enumerate(args.subjects):
        m = moves["moves"][sid]
        move = (f"{m['degrees']:.1f} deg, {np.linalg.norm(m['shift_mm']):.1f} mm, "
                f"x{m['scale']:.3f}")
        per_subject.append(f"| {sid} | {move} | " + " | ".join(
            f"{100 * results[r][i].mean_structure:.1f}" for r in rows) + " |")
    means = {r: 100 * np.array([s.mean_structure for s in results[r]]) for r in rows}
    per_subject.append("| **mean (std)** | | " + " | ".join(
        f"**{means[r].mean():.1f}** ({means[r].std():.1f})" for r in rows) + " |")
    atlas = json.loads((args.run / "atlas.json").read_text())["atlas"]
    lines = ["# Segmenting moved scans: `--align affine` vs the scans in place", "",
             f"Run `{args.run.name}` (atlas {atlas}), "
             f"validation subjects {args.subjects[0]}-{args.subjects[-1]}; moves drawn with seed "
             f"{args.seed} (<= 10 deg about a random axis, <= 10 mm, scale 0.95-1.05), scans and "
             "labels resampled onto FreeSurfer's 256^3 1 mm LIA grid and stored as .mgz "
             "(`experiments/moved_scans.py`). Moved rows are scored against the moved labels on "
             "the moved grid; unmoved rows against the original labels. Mean Dice (%) over the "
             "merged left/right structures.", "", *per_subject, ""]
    if "moved_aligned" in means and "unmoved_in_place" in means:
        gaps = means["moved_aligned"] - means["unmoved_in_place"]
        lines += [f"Moved + `--align affine` minus unmoved in place: **{gaps.mean():+.2f}** Dice "
                  f"points (per subject: {', '.join(f'{d:+.1f}' for d in gaps)}).", ""]
    if seconds:
        stages = [k for k in seconds[0] if k != "subject"]
        warm = "unmoved_aligned" in rows and rows.index("unmoved_aligned") < rows.index(
            "moved_aligned")
        lines += [f"Seconds per case, moved + `--align affine`, ANTs on one ITK thread, on 2 CPU "
                  f"cores shared with other jobs (load average {load['before'][0]:.1f} before, "
                  f"{load['after'][0]:.1f} after; " + (
                      "the segmenter had already run the unmoved scans, so TensorFlow's tracing "
                      "and XLA compilation (about 2.5 s, once per process) are not in here):"
                      if warm else "the first case includes TensorFlow's tracing and XLA "
                      "compilation, about 2.5 s once per process):"), "",
                  "| stage | mean | min | max |", "|---|---:|---:|---:|"]
        for stage in stages:
            values = np.array([s.get(stage, 0.0) for s in seconds])
            lines.append(f"| {stage} | {values.mean():.2f} | {values.min():.2f} | "
                         f"{values.max():.2f} |")
        lines.append("")
        atomic_write_text(args.out / "seconds.csv", csv_text(
            ["subject", *stages], [[s["subject"], *(f"{s.get(k, 0.0):.3f}" for k in stages)]
                                   for s in seconds]))
    lines += ["Per-subject scores per structure: `scores_<row>.csv`; seed, moves, registration "
              "settings and versions: `provenance.json`.", ""]
    atomic_write_text(args.out / "results.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
