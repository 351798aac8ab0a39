"""From a raw T1 to a table of volumes, measured on the FreeSurfer validation subjects: each
subject's whole-head T1.mgz and its brainmask.mgz segmented with refinement (skull detected and
removed automatically, the other subjects' heads as templates), scored against aseg.mgz.

    python experiments/whole_head.py --out results/whole_head
"""
import argparse
from pathlib import Path

import ltnet_keras  # noqa: F401  (sets up tf.keras before TensorFlow loads)
from ltnet_keras._compat import start_tensorflow_quietly

start_tensorflow_quietly()
from ltnet_keras.study.whole_head import measure_whole_head  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("results/freesurfer/ltnet"))
    parser.add_argument("--subjects", nargs="+", default=["sub-01", "sub-02", "sub-03", "sub-04"],
                        help="subject folders with T1.mgz, brainmask.mgz and aseg.mgz")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    measure_whole_head(args.run, args.subjects, args.out)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
