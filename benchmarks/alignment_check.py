"""Does alignment fail silently? The similarity (NCC on a 6 mm grid inside the atlas' head) of
scans aligned to an atlas, for the cases users meet, and what the half-turn start search costs.

    flock /tmp/cpu.lock python benchmarks/alignment_check.py --out results/alignment_check

Cases: the LPBA40 pool aligned to its atlas (S13, the committed runs' atlas), FreeSurfer scans
aligned to it and LPBA40 scans aligned to a FreeSurfer atlas (the cross-protocol cases), the
FreeSurfer pool aligned to sub-01, scans whose header is turned half a turn about x, y and z
(with the start search and without it, as before), and things that are not heads (smooth
noise, a cube). For a few pool scans the old path (no start search) runs too: same transform?
how many seconds more? Writes ``OUT/similarities.json`` (every case) and ``OUT/summary.json``
(per group: range of similarities, the thresholds a pool gives, seconds before/after), and
``OUT/provenance.json``. Numbers only: the scans stay where they are.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")   # reproducible ANTs

import json  # noqa: E402

import numpy as np  # noqa: E402

import ltnet_keras  # noqa: E402,F401
from ltnet_keras.config import default_data_root  # noqa: E402
from ltnet_keras.data import alignment_check as check  # noqa: E402
from ltnet_keras.data.align import register_affine, resample  # noqa: E402
from ltnet_keras.data.io import load_image, load_label_map  # noqa: E402
from ltnet_keras.data.labels import LabelTable  # noqa: E402
from ltnet_keras.evaluation import evaluate_pair  # noqa: E402
from ltnet_keras.records import atomic_write_text  # noqa: E402
from ltnet_keras.study.tables import write_provenance  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lpba40", type=Path, default=default_data_root())
    parser.add_argument("--freesurfer", type=Path,
                        help="FreeSurfer folder (default: beside the LPBA40 folder)")
    parser.add_argument("--atlas", default="S13", help="LPBA40 atlas")
    parser.add_argument("--fs-atlas", default="sub-01", help="FreeSurfer atlas")
    parser.add_argument("--pool", nargs="*", help="LPBA40 pool ids (default: all but the atlas)")
    parser.add_argument("--old-path", type=int, default=5,
                        help="pool scans also aligned the old way (no start search)")
    parser.add_argument("--turned", nargs="*", default=["S11", "S25", "sub-02", "sub-03"])
    parser.add_argument("--cross", type=int, default=10, help="LPBA40 scans aligned to the "
                        "FreeSurfer atlas")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    fs_root = args.freesurfer or args.lpba40.parent / "freesurfer"
    lpba = {p.name.split(".")[0]: p for p in sorted((args.lpba40 / "images").glob("S*.nii.gz"))}
    fs = {p.name: p / "brainmask.mgz" for p in sorted(fs_root.glob("sub-*"))}
    tables = {"lpba40": LabelTable.from_tsv(args.lpba40 / "labels.tsv"),
              "freesurfer": LabelTable.from_tsv(fs_root / "labels.tsv")}

    def files(sid):
        if sid in lpba:
            return lpba[sid], args.lpba40 / "labels" / lpba[sid].name, "lpba40"
        return fs[sid], fs[sid].parent / "aseg.mgz", "freesurfer"

    atlases = {sid: (load_image(files(sid)[0]), load_label_map(files(sid)[1]))
               for sid in (args.atlas, args.fs_atlas)}
    rows = []

    def run(group, sid, atlas_id, scan=None, search_start=True, turn=None, kind=None):
        scan_path, label_path, protocol = files(sid)
        scan = scan or load_image(scan_path)
        atlas, atlas_labels = atlases[atlas_id]
        alignment = register_affine(scan, atlas, search_start=search_start)
        row = {"group": group, "scan": sid, "atlas": atlas_id, "turn": turn, "kind": kind,
               "search_start": search_start, "start": alignment.start,
               "start_scores": alignment.start_scores, "similarity": alignment.similarity,
               "seconds": alignment.seconds, "atlas_to_scan": alignment.atlas_to_scan.tolist()}
        if kind is None and files(atlas_id)[2] == protocol:
            # Dice of the atlas labels moved by the affine alone onto the scan's own grid.
            moved = resample(atlas_labels.array, alignment.scan_voxel_to_atlas_voxel,
                             alignment.scan_shape, "label")
            truth = load_label_map(label_path).array
            row["affine_dice"] = evaluate_pair(moved, truth, tables[protocol]).mean_structure
        rows.append(row)
        print(f"[{group}] {sid} -> {atlas_id} turn={turn} kind={kind} search={search_start}: "
              f"start {alignment.start}, NCC {alignment.similarity:.3f}, "
              f"{sum(alignment.seconds.values()):.1f} s", flush=True)
        return row

    pool = args.pool or [s for s in lpba if s != args.atlas]
    for i, sid in enumerate(pool):
        run("lpba40_pool", sid, args.atlas)
        if i < args.old_path:
            run("lpba40_pool_old_path", sid, args.atlas, search_start=False)
    for sid in fs:
        run("freesurfer_to_lpba40", sid, args.atlas)
        if sid != args.fs_atlas:
            run("freesurfer_pool", sid, args.fs_atlas)
    for sid in [s for s in lpba if s != args.atlas][:args.cross]:
        run("lpba40_to_freesurfer", sid, args.fs_atlas)
    for sid in args.turned:
        for axis in ("x", "y", "z"):
            turned = check.half_turned_header(load_image(files(sid)[0]), axis)
            for search in (True, False):
                run("half_turned" if search else "half_turned_old_path", sid, args.atlas,
                    turned, search, turn=axis)
    for sid in (pool[0], args.fs_atlas if args.fs_atlas != "sub-01" else "sub-02"):
        like = load_image(files(sid)[0])
        for kind, seed in (("blob", 0), ("blob", 1), ("cube", 0)):
            run("not_a_head", sid, args.atlas, check.not_a_head(like, kind, seed), kind=kind)
    write(args, rows)


def summarise(rows):
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    summary = {}
    for group, members in groups.items():
        values = [r["similarity"] for r in members]
        entry = {"n": len(values), "similarity_min": min(values), "similarity_max": max(values),
                 "similarity_median": float(np.median(values)),
                 "starts": sorted({r["start"] for r in members}),
                 "seconds_mean": {k: float(np.mean([r["seconds"].get(k, 0.0) for r in members]))
                                  for k in members[0]["seconds"]}}
        entry["seconds_total_mean"] = float(sum(entry["seconds_mean"].values()))
        dice = [r["affine_dice"] for r in members if "affine_dice" in r]
        if dice:
            entry["affine_dice_mean"] = float(np.mean(dice))
        summary[group] = entry
    for group in ("lpba40_pool", "freesurfer_pool"):
        pool = {r["scan"]: r["similarity"] for r in groups.get(group, [])}
        if pool:
            summary[group]["thresholds"] = check.AlignmentThresholds.from_pool(pool).__dict__
    # The old path against the new on the same scans: same start, same transform?
    new = {r["scan"]: r for r in groups.get("lpba40_pool", [])}
    pairs = [(new[r["scan"]], r) for r in groups.get("lpba40_pool_old_path", [])]
    if pairs:
        summary["old_vs_new"] = {
            "scans": [a["scan"] for a, _ in pairs],
            "starts": [a["start"] for a, _ in pairs],
            "max_transform_difference": max(float(np.abs(np.subtract(a["atlas_to_scan"],
                                                                     b["atlas_to_scan"])).max())
                                            for a, b in pairs),
            "affine_dice": [[a["affine_dice"], b["affine_dice"]] for a, b in pairs],
            "seconds_new_mean": float(np.mean([sum(a["seconds"].values()) for a, _ in pairs])),
            "seconds_old_mean": float(np.mean([sum(b["seconds"].values()) for _, b in pairs])),
            "seconds_start_search_mean": float(np.mean([a["seconds"]["registration_start"]
                                                        for a, _ in pairs]))}
    turned = groups.get("half_turned", [])
    if turned:
        margins = [r["start_scores"][r["turn"]] - max(v for k, v in r["start_scores"].items()
                                                      if k != r["turn"]) for r in turned]
        summary["half_turned"]["right_start"] = sum(r["start"] == r["turn"] for r in turned)
        summary["half_turned"]["start_margin_min"] = float(min(margins))
    normal = [r for g in ("lpba40_pool", "freesurfer_pool", "freesurfer_to_lpba40",
                          "lpba40_to_freesurfer") for r in groups.get(g, [])]
    identity_scores = [r["start_scores"]["identity"] - max(v for k, v in r["start_scores"].items()
                                                           if k != "identity") for r in normal]
    summary["normal_orientation_start_margin_min"] = float(min(identity_scores))
    defaults = check.AlignmentThresholds()
    summary["default_thresholds"] = {"warn": defaults.warn, "refuse": defaults.refuse}
    summary["outcome_with_defaults"] = {
        group: {outcome: sum(1 for r in members if outcome == _outcome(r["similarity"], defaults))
                for outcome in ("pass", "warn", "refuse")} for group, members in groups.items()}
    return summary


def _outcome(similarity, thresholds):
    return ("refuse" if similarity < thresholds.refuse else
            "warn" if similarity < thresholds.warn else "pass")


def write(args, rows):
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "similarities.json", json.dumps(rows, indent=1))
    summary = summarise(rows)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2))
    write_provenance(args.out, "alignment_check", {}, extra={
        "atlas": args.atlas, "fs_atlas": args.fs_atlas,
        "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"),
        "similarity_spacing_mm": check.SIMILARITY_SPACING,
        "start_search": {"spacing_mm": check.START_SPACING,
                         "iterations": check.START_ITERATIONS, "margin": check.START_MARGIN}})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
