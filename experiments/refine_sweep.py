"""Sweep of test-time refinement settings on the LPBA40 validation subjects S31-S40 (only).

Each named setting of the YAML file(s) refines G_F's forward field (``--run``) of every
subject, scores the atlas labels it carries onto the scan (mean Dice over merged left/right
structures, the project's definition) and times it (network, refinement, label warp; one
untimed warm-up case first compiles every level). A failing setting stays in the table with
its error. Writes ``summary.csv``, ``cases.csv``, ``summary.md`` and ``provenance.json`` to
``--out``.

    flock /tmp/cpu.lock python experiments/refine_sweep.py \\
        experiments/configs/refine/region.yaml --subjects S31 S32 S33 --out results/refine/region
"""
import argparse
import os
import sys

import ltnet_keras  # noqa: F401  (before TensorFlow: selects Keras 2)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="YAML files: settings: {name: {...}}")
    parser.add_argument("--run", default="results/recipe/voxelmorph",
                        help="training run whose G_F starts the refinement")
    parser.add_argument("--subjects", nargs="+", default=[f"S{i}" for i in range(31, 41)],
                        help="validation subjects (S31-S40 only)")
    parser.add_argument("--only", nargs="*", default=None, help="names of settings to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow intra/inter-op threads (default 1)")
    parser.add_argument("--baseline", action="store_true", help="also score G_F alone")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    allowed = {f"S{i}" for i in range(31, 41)}
    if not set(args.subjects) <= allowed:
        sys.exit(f"refinement is swept on the validation subjects S31-S40 only; got "
                 f"{sorted(set(args.subjects) - allowed)}")
    from ltnet_keras.study import refine_sweep as sweep
    sweep.set_threads(args.threads)
    import yaml

    from ltnet_keras.config import default_data_root
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.refine import RefineSettings
    named = {"G_F alone": None} if args.baseline else {}
    for path in args.configs:
        with open(path) as handle:
            for name, values in (yaml.safe_load(handle) or {}).get("settings", {}).items():
                if args.only is None or name in args.only:
                    try:
                        named[name] = RefineSettings(**values)
                    except (TypeError, ValueError) as error:
                        print(f"{name}: invalid settings: {error}")
    root = default_data_root()
    table = LabelTable.from_tsv(root / "labels.tsv")
    maker = sweep.CaseMaker(args.run)
    cases = sweep.load_cases(maker, args.subjects, root)
    notes = [f"Subjects: {', '.join(args.subjects)}; G_F of `{args.run}`; {args.threads} "
             "TensorFlow thread(s). Dice: per subject the mean over merged left/right "
             "structures (%), then mean (std) and min over subjects. Seconds per case after "
             "one untimed warm-up case (XLA compilation); total = network + refinement + "
             "label warp to the scan's 1 mm grid."]

    def write(summaries, rows):
        sweep.write_records(args.out, summaries, rows,
                            {"notes": notes, "subjects": args.subjects, "run": args.run,
                             "threads": args.threads, "seeds": "none: refinement is "
                             "deterministic (Adam from G_F's field, no sampling)"},
                            root, "Test-time refinement of G_F's forward field: sweep")

    sweep.run_settings(maker, cases, named, table, after_each=write)


if __name__ == "__main__":
    main()
