"""Majority vote of 5 label maps on FreeSurfer's 256^3 grid: the pairwise vote over the whole
stack (before issue 28) against :func:`ltnet_keras.inference.fusion.majority_vote` (votes only
where the maps disagree), seconds side by side, outputs checked equal.

    nice -n 19 python benchmarks/vote.py [--data ../shared/data/freesurfer]

Two sets of maps: ``shifted``: one subject's aseg and 4 copies moved by 1-2 voxels along
random axes (what atlases warped onto one scan look like: they differ along boundaries);
``shifted-F``: the same in Fortran order (as nibabel reads them);
``subjects``: the asegs of 5 different subjects, not aligned (much more disagreement).
"""
import argparse
import time
from pathlib import Path

import numpy as np

from ltnet_keras.inference.fusion import majority_vote


def old_majority_vote(label_maps):
    """The vote as it was: every map against every other over the whole grid."""
    maps = [np.asarray(m) for m in label_maps]
    if len(maps) == 1:
        return maps[0].copy()
    stack = np.stack(maps)
    counts = np.zeros(stack.shape, dtype=np.int16)
    for i in range(len(maps)):
        for j in range(len(maps)):
            counts[i] += stack[i] == stack[j]
    best = np.argmax(counts, axis=0)
    return np.take_along_axis(stack, best[None], axis=0)[0]


def timed(function, maps, repeats):
    best, result = np.inf, None
    for _ in range(repeats):
        clock = time.perf_counter()
        result = function(maps)
        best = min(best, time.perf_counter() - clock)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                        / "freesurfer")
    parser.add_argument("--repeats", type=int, default=1, help="best of N (old: always 1)")
    args = parser.parse_args(argv)
    import nibabel as nib
    asegs = sorted(args.data.glob("sub-*/aseg.mgz"))[:5]
    if not asegs:
        raise SystemExit(f"no sub-*/aseg.mgz under {args.data}")

    def read(path):   # C order, as the segmenter's label maps are (nibabel gives Fortran's)
        return np.ascontiguousarray(np.asarray(nib.load(path).dataobj), dtype=np.int32)
    first = read(asegs[0])
    rng = np.random.default_rng(0)
    shifted = [first]
    for _ in range(4):
        moved = first
        for axis in rng.choice(3, size=2, replace=False):
            moved = np.roll(moved, int(rng.choice([-2, -1, 1, 2])), axis=axis)
        shifted.append(moved)
    sets = {"shifted": shifted, "shifted-F": [np.asfortranarray(m) for m in shifted]}
    if len(asegs) == 5:
        sets["subjects"] = [read(p) for p in asegs]
    print(f"{'maps':<10} {'shape':<16} {'labels':>6} {'disagree %':>10} {'old s':>8} "
          f"{'new s':>8} {'speed-up':>8}  equal")
    for name, maps in sets.items():
        stack = np.stack(maps)
        disagree = 100 * (stack != stack[0]).any(axis=0).mean()
        labels = len(np.unique(stack))
        del stack
        old_seconds, old = timed(old_majority_vote, maps, 1)
        new_seconds, new = timed(majority_vote, maps, args.repeats)
        equal = old.dtype == new.dtype and np.array_equal(old, new)
        print(f"{name:<10} {str(maps[0].shape):<16} {labels:>6} {disagree:>10.2f} "
              f"{old_seconds:>8.2f} {new_seconds:>8.3f} {old_seconds / new_seconds:>8.0f}x  "
              f"{equal}")
        if not equal:
            raise SystemExit(f"{name}: the outputs differ")


if __name__ == "__main__":
    main()
