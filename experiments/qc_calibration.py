"""Calibrate a run's QC model (`ltnet segment --qc`) on its validation subjects and degraded copies
of them (noise, bias field, blur, thick slices, partial field of view, ghosting, motion): every
case segmented with refinement and scored, the model fitted and judged leaving one subject out.

    python experiments/qc_calibration.py experiments/configs/qc/freesurfer.yaml \
        --out results/qc/freesurfer --install
    python experiments/qc_calibration.py experiments/configs/qc/lpba40.yaml \
        --out results/qc/lpba40 --install

Resumes from OUT/cases.csv. --install copies the fitted model to the run (RUN/qc_model.json),
where `ltnet segment --qc` finds it.
"""
import argparse
import shutil
from pathlib import Path

import yaml

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras._compat import start_tensorflow_quietly

start_tensorflow_quietly()
from ltnet_keras.inference.qc import MODEL_FILE  # noqa: E402
from ltnet_keras.study.qc_calibration import CalibrationSettings, calibrate  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="YAML: run, subjects, degradations, ...")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--subjects", nargs="+", help="override the config's subjects")
    parser.add_argument("--install", action="store_true", help="copy the model into the run")
    args = parser.parse_args(argv)
    values = yaml.safe_load(args.config.read_text())
    run = Path(values.pop("run"))
    if args.subjects:
        values["subjects"] = args.subjects
    settings = CalibrationSettings(**values)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config, args.out / "config.yaml")
    model = calibrate(run, settings, args.out)
    print((args.out / "summary.md").read_text())
    if args.install:
        shutil.copy(args.out / MODEL_FILE, run / MODEL_FILE)
        print(f"installed: {run / MODEL_FILE} (threshold {100 * model.threshold:.1f})")


if __name__ == "__main__":
    main()
