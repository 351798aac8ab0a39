"""What a run's G_F adds over the affine step: Dice of each validation subject segmented
through the run's own pipeline (alignment, crop window, network grid, label transfer) once
with G_F's field and once with that field replaced by zeros.

    python benchmarks/zero_field.py --run runs/freesurfer/ltnet --out results/freesurfer/zero_field.json

With a zero field the labels move by the affine step alone, so the zero-field row must equal
the table's "affine only" row when every scan is cropped with the atlas' window
(``data.crop: atlas``); with windows centred on each scan's own brain it does not, and G_F has
to learn the offsets between the windows (``results/freesurfer/own_brain_crop/``).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import ltnet_keras  # noqa: F401  (must precede TensorFlow)
from ltnet_keras._compat import start_tensorflow_quietly


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="JSON with every subject's two scores")
    parser.add_argument("--alignment-cache", type=Path,
                        help="folder to keep the affine alignments in for a rerun (none by "
                             "default: the run may be a committed one, and the cache records "
                             "this machine's paths)")
    args = parser.parse_args(argv)
    tf = start_tensorflow_quietly()
    from ltnet_keras import evaluation
    from ltnet_keras.data.dataset import subject_files
    from ltnet_keras.data.io import load_subject
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.records import atomic_write_text

    segmenter = Segmenter(args.run, alignment_cache=args.alignment_cache)
    data = segmenter.config.data
    table = LabelTable.from_tsv(data.resolved_labels_tsv())
    network_field = segmenter._predict_field
    fields = {"G_F": network_field,
              "zero": lambda target: tf.zeros_like(network_field(target))}
    rows = []
    for files in subject_files(data, data.val_subjects):
        _, truth = load_subject(files.image, files.label, table)
        row = {"subject": files.id}
        for name, field in fields.items():
            segmenter._predict_field = field
            labels = segmenter.segment(files.image).labels
            row[name] = evaluation.evaluate_pair(labels, truth.array, table,
                                                 files.id).mean_label
        rows.append(row)
        print(f"{files.id}: mean Dice over the labels, G_F {100 * row['G_F']:.1f}, "
              f"zero field {100 * row['zero']:.1f}", flush=True)
    for name in fields:
        print(f"mean {name}: {100 * sum(r[name] for r in rows) / len(rows):.1f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(
            {"run": args.run.name, "crop": data.resolved_crop(), "subjects": rows,
             "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
