"""The README's main job: a short real LT-Net training on LPBA40, then evaluation.

Trains the preset of the config (resuming if the run directory holds a checkpoint), segments
the held-out subjects with both label warps, and prints their Dice next to the
no-registration baseline. Everything is written into the run directory.
"""
import argparse

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras.config import load_config
from ltnet_keras.experiment import run_experiment


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--steps", type=int, help="override train.steps")
    args = parser.parse_args()
    overrides = {"train.steps": args.steps} if args.steps is not None else None
    config = load_config(args.config, overrides)
    print(run_experiment(config, args.out, verbose=2))


if __name__ == "__main__":
    main()
