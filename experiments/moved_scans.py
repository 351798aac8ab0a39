"""Copies of LPBA40 scans as a user would bring them: each head moved in the scanner (a rotation
of at most 10 degrees about a random axis, a shift of at most 10 mm, a 0.95-1.05 size change)
and stored as FreeSurfer stores it (256^3, 1 mm, LIA, .mgz), its labels moved the same way
(nearest neighbour) to score a segmentation on the moved grid.

    python experiments/moved_scans.py --seed 0 --out /tmp/moved      # S31-S40 by default

Writes ``OUT/images/<id>.mgz``, ``OUT/labels/<id>.mgz`` and ``OUT/moves.json`` (each move and
the seed). Write OUTSIDE the repository: these are MRI data.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import ltnet_keras  # noqa: F401
from ltnet_keras.config import default_data_root
from ltnet_keras.data.io import find_subjects, load_subject, save_volume
from ltnet_keras.data.moved import conformed_grid, move_volume, random_move

DEFAULT_SUBJECTS = [f"S{i}" for i in range(31, 41)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="LPBA40 root (default "
                        "$LTNET_DATA or ../shared/data/lpba40)")
    parser.add_argument("--subjects", nargs="*", default=DEFAULT_SUBJECTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-degrees", type=float, default=10.0)
    parser.add_argument("--max-shift-mm", type=float, default=10.0)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.95, 1.05))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    available = find_subjects(args.data or default_data_root())
    rng = np.random.default_rng(args.seed)
    moves = {}
    for sid in args.subjects:
        files = available[sid]
        image, labels = load_subject(files.image, files.label)
        move = random_move(rng, image, args.max_degrees, args.max_shift_mm, tuple(args.scale))
        shape, affine = conformed_grid(image)
        save_volume(move_volume(image, move.matrix, shape, affine, "image").array,
                    args.out / "images" / f"{sid}.mgz", affine)
        save_volume(move_volume(labels, move.matrix, shape, affine, "label").array,
                    args.out / "labels" / f"{sid}.mgz", affine)
        moves[sid] = move.to_dict()
        print(f"{sid}: {move.degrees:.1f} deg, shift "
              f"{np.linalg.norm(move.shift_mm):.1f} mm, scale {move.scale:.3f}")
    (args.out / "moves.json").write_text(json.dumps(
        {"seed": args.seed, "max_degrees": args.max_degrees, "max_shift_mm": args.max_shift_mm,
         "scale_range": list(args.scale), "grid": "256^3 1 mm LIA (FreeSurfer conformed)",
         "moves": moves}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
