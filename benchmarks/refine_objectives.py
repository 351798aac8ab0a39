"""Issue 26's comparison, timed side by side: the default ``--refine`` (G_F's start, plain
objective) against ``--refine-start zero --refine-objective plain`` and the ``ltnet``
objective, same levels and steps, on validation subjects. Settings take turns on each case
(one untimed warm-up case per setting first), so a busy machine slows them alike.

    python benchmarks/refine_objectives.py --run results/recipe/ltnet --subjects S31 S32 S33
"""
import argparse
import json
import os
import sys
from pathlib import Path

import ltnet_keras  # noqa: F401  (before TensorFlow: selects Keras 2)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SETTINGS = {"default (network, plain)": {},
            "zero start, plain": {"start": "zero"},
            "network start, ltnet": {"objective": "ltnet"},
            "zero start, ltnet": {"start": "zero", "objective": "ltnet"}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="results/recipe/ltnet")
    parser.add_argument("--subjects", nargs="+", default=[f"S{i}" for i in range(31, 41)])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the table and numbers here (.md/.json)")
    args = parser.parse_args(argv)
    import numpy as np

    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.refine import RefineSettings
    from ltnet_keras.records import package_versions
    from ltnet_keras.study import refine_sweep as sweep
    sweep.set_threads(args.threads)
    maker = sweep.CaseMaker(args.run)
    root = maker.segmenter.config.data.resolved_root()
    table = LabelTable.from_tsv(maker.segmenter.config.data.resolved_labels_tsv())
    cases = sweep.load_cases(maker, args.subjects, root)
    named = {name: RefineSettings(**values) for name, values in SETTINGS.items()}
    for settings in named.values():
        sweep.warm_up(maker, cases[0], settings, table)
    rows = {name: [] for name in named}
    for case in cases:
        for name, settings in named.items():
            row = sweep.run_case(maker, case, settings, table)
            rows[name].append(row)
            print(f"{case.subject} {name}: Dice {row['dice']:.2f}, refine {row['refine_s']:.2f} s",
                  flush=True)
    baseline = np.array([r["refine_s"] for r in rows["zero start, plain"]])
    base_dice = np.array([r["dice"] for r in rows["zero start, plain"]])
    lines = [f"| setting | Dice | vs zero/plain | refine s/case | time vs zero/plain | "
             f"round trip mm |", "|---|---|---|---|---|---|"]
    summary = {}
    for name, found in rows.items():
        dice = np.array([r["dice"] for r in found])
        seconds = np.array([r["refine_s"] for r in found])
        trip = [r.get("inverse_consistency_mm") for r in found]
        trip = np.mean(trip) if all(t is not None for t in trip) else float("nan")
        summary[name] = {"dice": float(dice.mean()), "gain": float((dice - base_dice).mean()),
                         "refine_s": float(seconds.mean()),
                         "time_ratio": float(seconds.sum() / baseline.sum()),
                         "inverse_consistency_mm": float(trip), "settings": SETTINGS[name]}
        s = summary[name]
        lines.append(f"| {name} | {s['dice']:.2f} | {s['gain']:+.2f} | {s['refine_s']:.2f} | "
                     f"{s['time_ratio']:.2f}x | {s['inverse_consistency_mm']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(
            f"# Refinement starts and objectives side by side\n\n`{' '.join(sys.argv)}`; "
            f"G_F of `{args.run}`, subjects {', '.join(args.subjects)}, {args.threads} thread(s), "
            "settings in turn on each case.\n\n" + text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"run": args.run, "subjects": args.subjects, "threads": args.threads,
             "summary": summary, "cases": rows, "packages": package_versions()},
            indent=2, default=float))


if __name__ == "__main__":
    main()
