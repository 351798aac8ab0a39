"""The README's main job (`make demo`): train the recipe LT-Net and its VoxelMorph twin briefly on
LPBA40, then segment the validation subjects with each G_F, with LT-Net + test-time refinement
and with ANTs SyN (same atlas), and write one table and one picture (ltnet_keras.study.demo).

Trainings resume when their run directory holds a checkpoint, so an interrupted demo continues.
"""
import argparse

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras._compat import start_tensorflow_quietly

# The demo's terminal shows progress and results, not TensorFlow's C++ start-up log.
start_tensorflow_quietly()
from ltnet_keras.baselines.syn import SMOKE_SYN, SynSettings  # noqa: E402
from ltnet_keras.config import load_config  # noqa: E402
from ltnet_keras.inference.refine import RefineSettings, parse_levels  # noqa: E402
from ltnet_keras.study.demo import DemoSettings, run_demo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, nargs="+", help="one YAML per run")
    parser.add_argument("--out", required=True, help="folder of run directories and the table")
    parser.add_argument("--steps", type=int, help="override train.steps of every config")
    parser.add_argument("--subjects", nargs="+", help="validation subjects to score (default: "
                        "the configs' data.val_subjects)")
    parser.add_argument("--refine-run", help="config name whose G_F is refined (default: the "
                        "last config)")
    parser.add_argument("--refine-levels", type=parse_levels,
                        help="refinement levels FACTOR:STEPS,... (default: RefineSettings())")
    parser.add_argument("--smoke", action="store_true", help="coarse SyN (checks the pipeline, "
                        "not a result)")
    args = parser.parse_args(argv)
    overrides = {"train.steps": args.steps} if args.steps is not None else None
    configs = [load_config(path, overrides) for path in args.config]
    refine = (RefineSettings(levels=args.refine_levels) if args.refine_levels
              else RefineSettings())
    settings = DemoSettings(refine=refine, syn=SMOKE_SYN if args.smoke else SynSettings(),
                            refine_run=args.refine_run, subjects=args.subjects)
    run_demo(configs, args.out, settings)
    print(open(f"{args.out}/demo.md").read())


if __name__ == "__main__":
    main()
