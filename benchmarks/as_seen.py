"""Issue 28's figures in one run: whole commands, wall clock, both tools on the same cores,
``ltnet segment`` beside an ANTs SyN command doing the same job, and both label maps scored.

1. ``one``: one LPBA40 scan, a fresh process each (compiled programs cached by an earlier
   run on the machine), medians of ``--repeats``;
2. ``batch``: nine LPBA40 scans (S31-S39) in one command, ``--jobs 1`` and ``--jobs auto``;
3. ``freesurfer``: the FreeSurfer protocol run's validation scans (256^3 .mgz, ``--align
   affine --refine``) in one command.
SyN: affine + SyN at 3 mm, labels warped back and written (``baselines/syn.py``, Table 3's
settings), one process for the whole list, ITK on all cores. ``ltnet`` runs as a user runs it:
TensorFlow on all cores, the ANTs affine inside it on one ITK thread (its default: the same
affine bit for bit run after run and under ``--jobs``, which the FreeSurfer job checks).

    python benchmarks/as_seen.py --out results/as_seen
    python benchmarks/as_seen.py --only one batch --repeats 1
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fresh_process import LTNET, REPO, score, timed  # noqa: E402

SYN_BATCH = """
import sys
import ltnet_keras  # noqa: F401
from ltnet_keras.baselines.syn import SynSettings, register_atlas
from ltnet_keras.data.io import load_image, load_subject, save_volume
from ltnet_keras.data.labels import LabelTable
atlas_image, atlas_labels, table, out = sys.argv[1:5]
atlas, labels = load_subject(atlas_image, atlas_labels, LabelTable.from_tsv(table))
for scan_path in sys.argv[5:]:
    scan = load_image(scan_path)
    warped = register_atlas(atlas, labels, scan, SynSettings())
    save_volume(warped.labels, f"{out}/{scan_path.split('/')[-2]}_{scan_path.split('/')[-1]}",
                scan.affine)
"""


def _subjects(run: Path):
    from ltnet_keras.config import load_config
    from ltnet_keras.data.io import find_subjects
    config = load_config(run / "config.yaml")
    files = find_subjects(config.data.resolved_root())
    atlas = json.loads((run / "atlas.json").read_text())["atlas"]
    return config, files, files[atlas]


def _job(run: Path, subjects, folder: Path, env, jobs=None, repeats=1) -> dict:
    """``ltnet segment`` and the SyN command on ``subjects``; medians over ``repeats``."""
    config, files, atlas = _subjects(run)
    scans = [str(files[s].image) for s in subjects]
    table = str(config.data.resolved_labels_tsv())
    row = {"run": str(run.relative_to(REPO)), "subjects": list(subjects)}
    ltnet_out, syn_out = folder / "ltnet", folder / "syn"
    syn_out.mkdir(parents=True, exist_ok=True)
    commands, warm_ups = {}, []
    for j in jobs or [None]:
        name = "ltnet" if j is None else f"ltnet_jobs_{j}"

        def command(images, out):
            return ([LTNET, "segment", "--run", str(run), "--align", config.data.align,
                     "--refine", "--overwrite", "--out", str(out), "--image", *images]
                    + ([] if j is None else ["--jobs", str(j)]))
        commands[name] = command(scans, ltnet_out / name)
        # "After a first run on the machine" of this command: its XLA programs compiled (a
        # --jobs worker, on one thread, has programs of its own), here on two of the scans.
        warm_ups.append(command(scans[:2], folder / "warm_up" / name))
    commands["syn"] = [sys.executable, "-c", SYN_BATCH, str(atlas.image), str(atlas.label),
                       table, str(syn_out), *scans]
    # ltnet as a user runs it: ANTs inside it on one ITK thread (its default, which keeps the
    # affine the same bit for bit from run to run and between --jobs); SyN on every core.
    ltnet_env = {k: v for k, v in env.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
    for warm_up in warm_ups:
        timed(warm_up, ltnet_env)
    seconds = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            seconds[name].append(timed(command, env if name == "syn" else ltnet_env))
    from ltnet_keras.inference.outputs import plan_output_paths
    for name in commands:
        out = syn_out if name == "syn" else ltnet_out / name
        # ltnet names outputs by subject (FreeSurfer's are all brainmask.mgz); SyN here by file.
        written = ([out / f"{Path(scan).parent.name}_{Path(scan).name}" for scan in scans]
                   if name == "syn" else
                   [p["labels"] for p in plan_output_paths(scans, out, overwrite=True)])
        dice = [score(path, files[s].label, table) for path, s in zip(written, subjects)]
        row[name] = {"seconds": statistics.median(seconds[name]), "all_seconds": seconds[name],
                     "per_scan_s": statistics.median(seconds[name]) / len(subjects),
                     "dice": statistics.mean(dice)}
    for name in commands:
        if name != "syn":
            row[name]["ratio_to_syn"] = row[name]["seconds"] / row["syn"]["seconds"]
    if jobs and len(jobs) > 1:      # --jobs must not change a single byte of a label map
        first, *others = [ltnet_out / f"ltnet_jobs_{j}" for j in jobs]
        row["jobs_outputs_identical"] = all(
            (first / path.name).read_bytes() == (other / path.name).read_bytes()
            for other in others for path in first.iterdir() if path.is_file())
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=["one", "batch", "freesurfer"],
                        choices=("one", "batch", "freesurfer"))
    parser.add_argument("--repeats", type=int, default=3, help="for the one-scan figure")
    parser.add_argument("--out", type=Path, help="write as_seen.json and as_seen.md here")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(cores),
               TF_CPP_MIN_LOG_LEVEL="2")
    lpba40, freesurfer = REPO / "results" / "recipe" / "ltnet", REPO / "results" / "freesurfer" / "ltnet"
    rows = {}
    if args.out and (args.out / "as_seen.json").exists():   # --only redoes some jobs
        rows = json.loads((args.out / "as_seen.json").read_text())
    rows.update({"cores": cores, f"date_{'_'.join(args.only)}": time.strftime("%Y-%m-%d %H:%M")})
    with tempfile.TemporaryDirectory(prefix="ltnet_as_seen_") as folder:
        folder = Path(folder)
        jobs = {"one": (lpba40, ["S31"], None, args.repeats),
                "batch": (lpba40, [f"S{i}" for i in range(31, 40)], [1, "auto"], 1),
                "freesurfer": (freesurfer, list(_subjects(freesurfer)[0].data.val_subjects),
                               [1, "auto"], 1)}
        for job in args.only:
            run, subjects, parallel, repeats = jobs[job]
            rows[job] = _job(run, subjects, folder / job, env, jobs=parallel, repeats=repeats)
            print(f"{job}: {json.dumps(rows[job])}", flush=True)
    lines = [f"# Whole commands, wall clock, {cores} cores for both tools", "",
             "| job | scans | command | s (whole command) | s/scan | Dice | ratio to SyN |",
             "|---|---|---|---|---|---|---|"]
    for job in ("one", "batch", "freesurfer"):
        if job not in rows:
            continue
        for name, r in rows[job].items():
            if isinstance(r, dict):
                lines.append(f"| {job} | {len(rows[job]['subjects'])} | {name} | "
                             f"{r['seconds']:.1f} | {r['per_scan_s']:.1f} | {r['dice']:.2f} | "
                             f"{r.get('ratio_to_syn', 1.0):.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "as_seen.json").write_text(json.dumps(rows, indent=2))
        (args.out / "as_seen.md").write_text("\n".join(lines) + "\n\n`python benchmarks/"
                                             "as_seen.py " + " ".join(argv or sys.argv[1:])
                                             + "`\n")


if __name__ == "__main__":
    main()
