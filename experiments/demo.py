"""The README's main job: short real trainings on LPBA40, then evaluation.

Each config is trained (resuming if its run directory holds a checkpoint), the validation subjects
are segmented with both label warps, and one table compares every run with the
no-registration baseline. Each run's directory keeps its own results.md and CSVs.
"""
import argparse
from pathlib import Path

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras import evaluation
from ltnet_keras.config import load_config
from ltnet_keras.study.experiment import run_experiment
from ltnet_keras.records import atomic_write_text


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, nargs="+", help="one YAML per run")
    parser.add_argument("--out", required=True, help="folder of run directories")
    parser.add_argument("--steps", type=int, help="override train.steps of every config")
    args = parser.parse_args()
    overrides = {"train.steps": args.steps} if args.steps is not None else None
    out = Path(args.out)
    summaries = {}
    for path in args.config:
        config = load_config(path, overrides)
        results = run_experiment(config, out / config.name, verbose=2)
        for method, scores in results.items():
            label = method if method == "no_registration" else f"{config.name}: {method}"
            summaries[label] = evaluation.summarise(scores)
    table = evaluation.format_summary_table(summaries)
    atomic_write_text(out / "demo.md", "Mean Dice (%) over merged structures, validation "
                      "subjects\n\n```\n" + table + "\n```\n")
    print(table)


if __name__ == "__main__":
    main()
