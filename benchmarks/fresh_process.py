"""One scan, whole commands, a fresh process each: what a user sees, side by side with ANTs.

Times, on the same scan and the same cores, in one run (wall clock of each whole command):
1. ``ltnet segment --refine`` with an EMPTY compilation cache (every XLA program compiled);
2. the same command again: the programs come from the on-disk cache (``ltnet cache``);
3. ANTs SyN as a command of its own (Python start, antspyx import, affine + SyN at 3 mm, labels
   warped back and written: ``baselines/syn.py``'s Table 3 settings, ITK on all cores).
Both label maps are scored against the scan's manual labels. ``--repeats`` runs 2 and 3 that
many times, alternating, and reports the medians.

    python benchmarks/fresh_process.py --subject S31 --repeats 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The command of the environment this runs in (a venv need not be activated).
LTNET = str(Path(sys.executable).with_name("ltnet"))

SYN_COMMAND = """
import sys, time
import ltnet_keras  # noqa: F401
from ltnet_keras.baselines.syn import SynSettings, register_atlas
from ltnet_keras.data.io import load_image, load_subject, save_volume
from ltnet_keras.data.labels import LabelTable
atlas_image, atlas_labels, target, table, out = sys.argv[1:6]
atlas, labels = load_subject(atlas_image, atlas_labels, LabelTable.from_tsv(table))
scan = load_image(target)
warped = register_atlas(atlas, labels, scan, SynSettings())
save_volume(warped.labels, out, scan.affine)
"""


def timed(command, env) -> float:
    clock = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - clock
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{done.stderr[-2000:]}")
    return seconds


def score(labels_path, truth_path, table_path) -> float:
    """The project's per-subject Dice (%) of a written label map (``refine_sweep.score``)."""
    from ltnet_keras._compat import start_tensorflow_quietly
    start_tensorflow_quietly()   # scoring imports TensorFlow: without its start-up log
    from ltnet_keras.data.io import load_label_map
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.study.refine_sweep import score as dice
    return dice(load_label_map(labels_path).array, load_label_map(truth_path).array,
                LabelTable.from_tsv(table_path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "results" / "recipe" / "ltnet")
    parser.add_argument("--subject", default="S31")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    import ltnet_keras  # noqa: F401
    from ltnet_keras.config import load_config
    from ltnet_keras.data.io import find_subjects
    config = load_config(args.run / "config.yaml")
    root = config.data.resolved_root()
    files = find_subjects(root)
    atlas = json.loads((args.run / "atlas.json").read_text())["atlas"]
    scan, truth = files[args.subject].image, files[args.subject].label
    table = config.data.resolved_labels_tsv()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="ltnet_fresh_") as folder:
        folder = Path(folder)
        env = dict(os.environ, LTNET_XLA_CACHE=str(folder / "xla"),
                   ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(cores))
        env.pop("TF_XLA_FLAGS", None)
        ltnet = [LTNET, "segment", "--run", str(args.run), "--image", str(scan), "--align",
                 config.data.align, "--refine", "--overwrite", "--out"]
        syn = [sys.executable, "-c", SYN_COMMAND, str(files[atlas].image), str(files[atlas].label),
               str(scan), str(table), str(folder / "syn.nii.gz")]
        cold = timed(ltnet + [str(folder / "cold")], env)
        warm, ants = [], []
        for _ in range(args.repeats):
            warm.append(timed(ltnet + [str(folder / "warm")], env))
            ants.append(timed(syn, env))
        name = Path(scan).name
        dice_ltnet = score(folder / "warm" / name, truth, table)
        dice_syn = score(folder / "syn.nii.gz", truth, table)
        same = (folder / "warm" / name).read_bytes() == (folder / "cold" / name).read_bytes()
    rows = {"ltnet_cold_s": cold, "ltnet_cached_s": statistics.median(warm),
            "syn_s": statistics.median(ants), "dice_ltnet": dice_ltnet, "dice_syn": dice_syn,
            "cached_labels_identical": same, "cores": cores, "subject": args.subject,
            "run": str(args.run.relative_to(REPO)) if args.run.is_relative_to(REPO)
            else str(args.run), "repeats": args.repeats, "all_cached_s": warm, "all_syn_s": ants}
    print(f"one scan ({args.subject}), whole commands, {cores} cores, medians of {args.repeats}")
    print(f"  ltnet segment --refine, empty compilation cache  {cold:6.1f} s")
    print(f"  ltnet segment --refine, programs from the cache  {rows['ltnet_cached_s']:6.1f} s"
          f"  Dice {dice_ltnet:.1f}  (labels identical to the cold run: {same})")
    print(f"  ANTs SyN command (affine + SyN, 3 mm)            {rows['syn_s']:6.1f} s"
          f"  Dice {dice_syn:.1f}")
    print(f"  ratio cached / SyN                               "
          f"{rows['ltnet_cached_s'] / rows['syn_s']:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
