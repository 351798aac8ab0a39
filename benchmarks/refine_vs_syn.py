"""Test-time refinement of G_F's field against ANTs SyN: seconds and Dice per case, one run,
same scans, same thread count.

Both methods get ``--threads`` threads (default 1): TensorFlow's intra- and inter-op pools
and ITK's (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, read when ``ants`` loads) are set to it
before either starts. SyN is the committed Table 3 baseline (``SynSettings()``: affine + SyN
at 3 mm, labels warped onto the scan's 1 mm grid). Refinement: G_F of ``--run`` then
``refine_field`` (``RefineSettings()`` unless ``--config``/``--name``); its seconds are split
into network, refinement (and per level: ms per Adam step) and label warp. One untimed
warm-up case first compiles the refinement's XLA programs (its seconds are printed too).

    flock /tmp/cpu.lock python benchmarks/refine_vs_syn.py --threads 1
    flock /tmp/cpu.lock python benchmarks/refine_vs_syn.py --threads 2 --subjects S31 S32
"""
import argparse
import json
import os
import time

import ltnet_keras  # noqa: F401  (before TensorFlow)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--subjects", nargs="+", default=[f"S{i}" for i in range(31, 41)])
    parser.add_argument("--run", default="results/recipe/voxelmorph")
    parser.add_argument("--config", help="YAML of named settings (experiments/configs/refine)")
    parser.add_argument("--name", help="setting of --config to use")
    parser.add_argument("--skip-syn", action="store_true", help="time the refinement only")
    parser.add_argument("--json", help="also write the per-case rows here")
    args = parser.parse_args(argv)

    from ltnet_keras.study import refine_sweep as sweep
    sweep.set_threads(args.threads)
    from ltnet_keras.baselines.syn import SynSettings, register_atlas
    from ltnet_keras.config import default_data_root
    from ltnet_keras.data.io import find_subjects, load_image, load_subject
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.refine import RefineSettings
    settings = RefineSettings()
    if args.config:
        import yaml
        with open(args.config) as handle:
            settings = RefineSettings(**yaml.safe_load(handle)["settings"][args.name])
    root = default_data_root()
    table = LabelTable.from_tsv(root / "labels.tsv")
    maker = sweep.CaseMaker(args.run)
    files = find_subjects(root)
    atlas_id = json.loads(open(os.path.join(args.run, "atlas.json")).read())["atlas"]
    atlas_image, atlas_labels = load_subject(files[atlas_id].image, files[atlas_id].label, table)
    syn = SynSettings()
    print(f"threads: TensorFlow intra/inter-op {args.threads}, ITK "
          f"{os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS']}; atlas {atlas_id}")
    print(f"refinement: {sweep.setting_name(settings)}")
    print(f"SyN: {syn.describe()}")
    cases = sweep.load_cases(maker, args.subjects, root)
    print(f"warm-up (compilation) {sweep.warm_up(maker, cases[0], settings, table):.1f} s")
    header = (f"{'case':5} {'G_F':>6} {'refined':>8} {'SyN':>6} | {'network':>7} {'refine':>7} "
              f"{'warp':>5} {'total':>6} {'SyN s':>6} {'ratio':>6} | ms/step per level")
    print(header)
    rows = []
    for case in cases:
        alone = sweep.run_case(maker, case, None, table)
        row = sweep.run_case(maker, case, settings, table)
        row["dice_gf"] = alone["dice"]
        if not args.skip_syn:
            target = load_image(files[case.subject].image)
            clock = time.perf_counter()
            warped = register_atlas(atlas_image, atlas_labels, target, syn)
            row["syn_s"] = time.perf_counter() - clock
            row["dice_syn"] = sweep.score(warped.labels, case.truth, table)
        else:
            row["syn_s"], row["dice_syn"] = float("nan"), float("nan")
        row["ratio"] = row["syn_s"] / row["total_s"]
        rows.append(row)
        print(f"{case.subject:5} {row['dice_gf']:6.2f} {row['dice']:8.2f} {row['dice_syn']:6.2f} | "
              f"{row['network_s']:7.2f} {row['refine_s']:7.2f} {row['warp_s']:5.2f} "
              f"{row['total_s']:6.2f} {row['syn_s']:6.2f} {row['ratio']:6.2f} | "
              f"{row['step_ms']} ({row['steps']} steps)", flush=True)

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)
    print(f"{'mean':5} {mean('dice_gf'):6.2f} {mean('dice'):8.2f} {mean('dice_syn'):6.2f} | "
          f"{mean('network_s'):7.2f} {mean('refine_s'):7.2f} {mean('warp_s'):5.2f} "
          f"{mean('total_s'):6.2f} {mean('syn_s'):6.2f} {mean('syn_s') / mean('total_s'):6.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "settings": settings.to_dict(), "rows": rows},
                      handle, indent=2, default=str)


if __name__ == "__main__":
    main()
