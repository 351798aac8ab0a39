"""Multi-atlas segmentation of FreeSurfer's 256^3 scans, the path before issue 28 against the
fast one (``MultiAtlasSegmenter(fast=True)``, :mod:`ltnet_keras.inference.atlas_space`), side
by side: seconds per stage and Dice of each, on the same scans, in one process.

    nice -n 19 python benchmarks/multi_atlas_speed.py --subjects sub-01 sub-02

Each validation subject is segmented with the run's atlas (sub-05) first, then every other
FreeSurfer subject but itself (leave the scan out: 4 atlases), majority vote, refinement on
(``ltnet segment --atlases ... --refine``). Paths (``--paths``): ``old`` (each atlas registered
to the scan, the scan resampled onto each whole atlas grid, atlases ranked by warping each at
1 mm), ``new`` (the fast path: one registration, composed), ``direct`` (the fast path with each
atlas registered to the scan: what composing the alignments costs in Dice), ``coarse`` (the fast
path, the atlases after the first refined without the 2 mm level: an experiment, not kept,
``--coarse-levels``). One segmenter per
atlas serves every path and scan; a warm-up case (``--warmup``, the first subject, new path,
untimed) traces and compiles the programs every path shares, so no timed case pays for it. The
fast path's atlas-to-atlas registrations are made once (``setup`` seconds, printed apart).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]
STAGES = {"read": ["read"],
          "affine": ["registration_resample", "registration_start", "registration_ants",
                     "registration_similarity", "registration_cached", "atlas_alignment"],
          "to_atlas_space": ["to_atlas_space"], "network": ["network"], "refine": ["refine"],
          "labels_to_scan_grid": ["labels_to_scan_grid"], "rank+fusion": ["rank", "fusion"]}


def atlases_for(subject, first, include_self=False):
    """The run's atlas, then every other subject but the scan itself (``include_self``: and the
    scan's own labelled copy last, as ``--atlases`` with all five subjects does: a timing case,
    its Dice flattered by the scan's own labels)."""
    others = [s for s in SUBJECTS if s not in (first, subject)]
    return [first] + others + ([subject] if include_self and subject != first else [])


def stage_seconds(seconds):
    grouped = {name: sum(seconds.get(k, 0.0) for k in keys) for name, keys in STAGES.items()}
    known = {k for keys in STAGES.values() for k in keys}
    grouped["other"] = sum(v for k, v in seconds.items() if k not in known)
    return grouped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "results" / "freesurfer" / "ltnet")
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "freesurfer")
    parser.add_argument("--subjects", nargs="+", default=["sub-01", "sub-02"])
    parser.add_argument("--paths", nargs="+", default=["old", "new"],
                        choices=["old", "new", "direct", "coarse"])
    parser.add_argument("--coarse-levels", default="8:40,4:30",
                        help="path 'coarse': the new path with the atlases after the first "
                             "refined on these levels only (FACTOR:STEPS,...)")
    parser.add_argument("--include-self", action="store_true",
                        help="each scan's own labelled copy as one more atlas (five atlases: the "
                             "issue's timing case; its Dice is not a result)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--no-refine", dest="refine", action="store_false")
    parser.add_argument("--json", type=Path, help="write every measurement here as well")
    args = parser.parse_args(argv)
    from ltnet_keras._compat import start_tensorflow_quietly
    start_tensorflow_quietly()   # the progress and the table, not TensorFlow's C++ log

    from ltnet_keras.data.io import load_label_map
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.data.skull import default_brain_finder
    from ltnet_keras.evaluation import evaluate_pair
    from ltnet_keras.inference.fusion import majority_vote
    from ltnet_keras.inference.multi_atlas import MultiAtlasSegmenter, atlas_files
    from ltnet_keras.inference.refine import RefineSettings
    from ltnet_keras.inference.segment import Segmenter

    first = json.loads((args.run / "atlas.json").read_text())["atlas"]
    table = LabelTable.from_tsv(args.data / "labels.tsv")
    needed = sorted({a for s in args.subjects
                     for a in atlases_for(s, first, args.include_self)})
    clock = time.perf_counter()
    finder = default_brain_finder(args.data)
    pool = {}
    for atlas in needed:
        (image, labels), = atlas_files([atlas], args.data)
        pool[atlas] = Segmenter(args.run, atlas_image=image, atlas_labels=labels,
                                refine=RefineSettings() if args.refine else None,
                                brain_finder=finder)
    coarse = {}
    if "coarse" in args.paths:
        levels = tuple(tuple(int(v) for v in level.split(":"))
                       for level in args.coarse_levels.split(","))
        for atlas in needed:
            if atlas != first:
                (image, labels), = atlas_files([atlas], args.data)
                coarse[atlas] = Segmenter(args.run, atlas_image=image, atlas_labels=labels,
                                          refine=RefineSettings(levels=levels),
                                          brain_finder=finder)
    print(f"segmenters for {needed}: {time.perf_counter() - clock:.1f} s", flush=True)

    def segmenter(subject, path):
        clock = time.perf_counter()
        chosen = [pool[a] if path != "coarse" or a == first else coarse[a]
                  for a in atlases_for(subject, first, args.include_self)]
        made = MultiAtlasSegmenter.from_segmenters(
            chosen, "majority", fast=path != "old",
            compose_alignments=path in ("new", "coarse"))
        return made, time.perf_counter() - clock

    if args.warmup:
        clock = time.perf_counter()
        made, _ = segmenter(args.subjects[0], "new")
        made.segment(args.data / args.subjects[0] / "brainmask.mgz")
        print(f"warm-up (untimed case, includes the atlases' registrations): "
              f"{time.perf_counter() - clock:.1f} s", flush=True)

    rows = []
    names = list(STAGES) + ["other"]
    print(f"{'subject':<8} {'path':<7} {'setup':>6} " + " ".join(f"{n[:12]:>12}" for n in names)
          + f" {'total':>7} {'Dice':>6}  vote order", flush=True)
    for subject in args.subjects:
        truth = load_label_map(args.data / subject / "aseg.mgz").array
        atlases = atlases_for(subject, first, args.include_self)
        fused, maps, orders = {}, {}, {}
        for path in args.paths:
            made, setup = segmenter(subject, path)
            made.keep_maps = True
            for one in [*pool.values(), *coarse.values()]:   # the checker keeps each scan's
                # alignment: forget it
                one.checker._checked.clear()
            clock = time.perf_counter()
            result = made.segment(args.data / subject / "brainmask.mgz")
            total = time.perf_counter() - clock
            fused[path], maps[path], orders[path] = result.labels, made.last_maps, made.last_order
            dice = 100 * evaluate_pair(result.labels, truth, table).mean_structure
            grouped = stage_seconds(result.seconds)
            order = [atlases[i] for i in made.last_order]
            rows.append({"subject": subject, "path": path, "setup": setup, "total": total,
                         "dice": dice, "stages": grouped, "seconds": result.seconds,
                         "order": order})
            print(f"{subject:<8} {path:<7} {setup:>6.1f} "
                  + " ".join(f"{grouped[n]:>12.2f}" for n in names)
                  + f" {total:>7.1f} {dice:>6.2f}  {' '.join(order)}", flush=True)
        if "old" in fused and "new" in fused:
            same = np.mean(fused["old"] == fused["new"]) * 100
            # What the ranking alone does: each path's maps voted in the other's order.
            swapped = {}
            for path, other in (("new", "old"), ("old", "new")):
                vote = majority_vote([maps[path][i] for i in orders[other]])
                swapped[path] = 100 * evaluate_pair(vote, truth, table).mean_structure
            print(f"{subject:<8} old vs new: {same:.3f} % of voxels equal; Dice of the new maps "
                  f"in the old order {swapped['new']:.2f}, of the old maps in the new order "
                  f"{swapped['old']:.2f}", flush=True)
            rows[-1]["swapped"] = swapped
    for path in args.paths:
        mine = [r for r in rows if r["path"] == path]
        print(f"mean {path:<7} total {np.mean([r['total'] for r in mine]):.1f} s, "
              f"Dice {np.mean([r['dice'] for r in mine]):.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
