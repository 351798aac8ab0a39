"""How much ANTs affine a segmentation needs (issue 28): ``ltnet segment --align affine
--refine`` on the FreeSurfer protocol run's validation scans with several registration budgets,
the final Dice (after G_F and refinement) beside the registration's seconds.

The affine only brings the scan near the atlas; G_F and refinement do the rest. Each budget runs
in this one process, one after another (ITK on one thread, as ``ltnet`` runs it).

    python benchmarks/alignment_budget.py --out results/alignment_budget
"""
import argparse
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Budgets on the same 3 mm registration grid (a block mean of 1 mm scans: no filtering).
BUDGETS = {
    "100 at 6 mm, 20 at 3 mm (default before 2026-12-06)": {
        "iterations": (100, 20), "shrink_factors": (2, 1), "smoothing_sigmas": (1, 0)},
    "100 at 6 mm, 5 at 3 mm": {
        "iterations": (100, 5), "shrink_factors": (2, 1), "smoothing_sigmas": (1, 0)},
    "100 at 6 mm only (the default)": {},
    "two levels, sampling 0.15": {
        "iterations": (100, 20), "shrink_factors": (2, 1), "smoothing_sigmas": (1, 0),
        "sampling_rate": 0.15},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "results" / "freesurfer" / "ltnet")
    parser.add_argument("--only", nargs="+", choices=list(BUDGETS), help="budgets to run")
    parser.add_argument("--out", type=Path, help="write budgets.json and budgets.md here")
    args = parser.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    import ltnet_keras  # noqa: F401
    from ltnet_keras._compat import start_tensorflow_quietly
    start_tensorflow_quietly()
    from ltnet_keras.config import load_config
    from ltnet_keras.data.align import RegistrationSettings
    from ltnet_keras.data.io import find_subjects, load_label_map
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.refine import RefineSettings
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.records import package_versions
    from ltnet_keras.study.refine_sweep import score
    config = load_config(args.run / "config.yaml")
    files = find_subjects(config.data.resolved_root())
    table = LabelTable.from_tsv(config.data.resolved_labels_tsv())
    subjects = list(config.data.val_subjects)
    rows = {}
    for name in args.only or BUDGETS:
        settings = RegistrationSettings(**BUDGETS[name])
        segmenter = Segmenter(args.run, align="affine", registration=settings,
                              refine=RefineSettings())
        cases = {}
        for subject in subjects:
            clock = time.perf_counter()
            result = segmenter.segment(files[subject].image)
            seconds = time.perf_counter() - clock
            dice = score(result.labels, load_label_map(files[subject].label).array, table)
            cases[subject] = {"dice": dice, "seconds": seconds,
                              "registration_ants": result.seconds["registration_ants"]}
            print(f"{name} | {subject}: Dice {dice:.2f}, {seconds:.1f} s, ANTs "
                  f"{result.seconds['registration_ants']:.2f} s", flush=True)
        rows[name] = {"settings": asdict(settings), "cases": cases,
                      "dice": statistics.mean(c["dice"] for c in cases.values()),
                      "registration_ants": statistics.mean(c["registration_ants"]
                                                           for c in cases.values()),
                      "seconds": statistics.mean(c["seconds"] for c in cases.values())}
    first = next(iter(rows.values()))
    lines = [f"# ANTs affine budget: {args.run.relative_to(REPO)}, validation "
             f"{', '.join(subjects)}",
             "", "| budget | Dice | vs first | ANTs s/scan | segment s/scan (this process) |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['dice']:.2f} | {row['dice'] - first['dice']:+.2f} | "
                     f"{row['registration_ants']:.2f} | {row['seconds']:.1f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"date": time.strftime("%Y-%m-%d %H:%M"), "run": str(args.run.relative_to(REPO)),
                  "cores": len(os.sched_getaffinity(0)), "versions": package_versions(),
                  "itk_threads": os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"],
                  "budgets": rows}
        (args.out / "budgets.json").write_text(json.dumps(record, indent=2))
        (args.out / "budgets.md").write_text("\n".join(lines) + "\n\n`python benchmarks/"
                                             "alignment_budget.py --out "
                                             f"{args.out}`\n")


if __name__ == "__main__":
    main()
