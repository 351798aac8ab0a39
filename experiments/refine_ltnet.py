"""Issue 26: does LT-Net pay at test time? Curves of Dice against refinement seconds for the
starts (identity, VoxelMorph's G_F, LT-Net's G_F + G_B) and objectives (plain, ltnet) on the
validation subjects, and the ablation of the test-time terms (``--ablation``).

    python experiments/refine_ltnet.py experiments/configs/refine_ltnet/lpba40.yaml
    python experiments/refine_ltnet.py experiments/configs/refine_ltnet/freesurfer.yaml

The YAML names the runs (``runs: {label: run_dir}``), which run gives the zero start, the
starts, objectives and budget scales, and ``out``. Resumable: measured cases are kept in
``OUT/cases.csv``; the summary, ``curves.png`` and ``provenance.json`` are rebuilt each time.
"""
import argparse
import os
import sys

import ltnet_keras  # noqa: F401  (before TensorFlow: selects Keras 2)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+",
                        help="YAML files (see experiments/configs/refine_ltnet/)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the summary and plot from cases.csv")
    parser.add_argument("--figure", help="also plot the curves of every config in one figure")
    args = parser.parse_args(argv)
    import yaml
    from ltnet_keras.study import refine_curves as curves
    from ltnet_keras.study.refine_sweep import set_threads
    set_threads(args.threads)
    specs = []
    for path in args.configs:
        with open(path) as handle:
            specs.append((path, yaml.safe_load(handle)))
    for path, spec in specs:
        run_spec(curves, path, spec, args)
    if args.figure:
        summaries = [s for _, spec in specs if not spec.get("ablation")
                     for s in curves.summarise(curves.read_cases(spec["out"]))]
        curves.plot_curves(list({(s["dataset"], s["run"], s["setting"]): s
                                 for s in summaries}.values()), args.figure)


def run_spec(curves, path, spec, args):
    if not args.report_only:
        from ltnet_keras.inference.refine import RefineSettings
        base = RefineSettings(**spec.get("base", {}))
        for label, run in spec["runs"].items():
            if spec.get("ablation"):
                named = curves.ablation_settings(base)
            else:
                starts = [s for s in spec["starts"] if s != "zero" or label == spec["zero_from"]]
                named = curves.curve_settings(starts, spec["objectives"], spec["scales"], base)
            curves.run_cases(run, named, spec["out"], label,
                             alignment_cache=spec.get("alignment_cache"))
    curves.write_report(spec, path, args.threads)


if __name__ == "__main__":
    sys.exit(main())
