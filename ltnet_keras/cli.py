"""``ltnet`` command line: thin wrappers that parse arguments and call the package."""
import argparse
import sys
import warnings
from pathlib import Path

from ltnet_keras._compat import set_tensorflow_log_level, start_tensorflow_quietly
from ltnet_keras.config import (ALIGN_MODES, PRESETS, SEGMENT_INTERPOLATIONS, DataConfig,
                                apply_overrides, config_from_dict, default_data_root, load_config)
from ltnet_keras.data.errors import VolumeError
from ltnet_keras.evaluation import UNKNOWN_LABELS


def _config_with_overrides(args):
    overrides = {}
    if getattr(args, "preset", None):
        overrides["preset"] = args.preset
    if getattr(args, "steps", None) is not None:
        overrides["train.steps"] = args.steps
    if getattr(args, "data", None):
        overrides["data.root"] = str(args.data)
    if getattr(args, "seed", None) is not None:
        overrides["train.seed"] = args.seed
    if args.config:
        return load_config(args.config, overrides)
    return config_from_dict(apply_overrides({}, overrides))


def cmd_prepare(args):
    from ltnet_keras.data.dataset import prepare_subjects, write_prepared
    from ltnet_keras.data.io import find_subjects
    from ltnet_keras.data.labels import LabelTable
    config = _config_with_overrides(args)
    data = config.data
    table = LabelTable.from_tsv(data.resolved_labels_tsv())
    subjects = args.subjects or sorted(find_subjects(data.resolved_root()))
    prepared = prepare_subjects(data, subjects, with_labels=True, table=table)
    written = write_prepared(prepared, args.out)
    print(f"wrote {len(written)} subjects on the network grid {data.network_shape} to {args.out}")


def cmd_select_atlas(args):
    from ltnet_keras.data.atlas import select_atlas
    from ltnet_keras.data.dataset import check_subject_files, subject_files
    from ltnet_keras.data.labels import LabelTable
    data = DataConfig(root=str(args.data or default_data_root()))
    if args.subjects:
        data.train_subjects = args.subjects
    files = subject_files(data, data.train_subjects)
    # The chosen scan becomes the labelled atlas: candidates' label maps are checked too,
    # against the folder's label table when it has one.
    tsv = data.resolved_labels_tsv()
    check_subject_files(files, LabelTable.from_tsv(tsv) if tsv.exists() else None)
    choice = select_atlas({f.id: f.image for f in files}, measure=args.measure, factor=args.factor)
    for subject, score in choice.scores.items():
        print(f"{subject}\t{score:.5f}")
    print(f"atlas: {choice.subject} (most similar to the pool's average, {choice.measure})")


def cmd_evaluate(args):
    from ltnet_keras import evaluation
    from ltnet_keras.data.labels import LabelTable
    table = LabelTable.from_tsv(args.labels)
    scores = evaluation.evaluate_folders(args.pred, args.truth, table, strict=args.strict,
                                         unknown_labels=args.unknown_labels)
    summary = {args.name: evaluation.summarise(scores, level=args.level)}
    print(evaluation.format_summary_table(summary))
    if args.per_structure:
        print(evaluation.format_structure_table({args.name: scores}))
    if args.out:
        evaluation.write_scores_csv(scores, args.out)
        print(f"per-subject scores: {args.out}")


def cmd_train(args):
    from ltnet_keras.training import train
    config = _config_with_overrides(args)
    result = train(config, args.out)
    print(f"trained {result.steps_done} steps (resumed from {result.resumed_from}) in {args.out}")


def cmd_segment(args):
    from tqdm import tqdm

    from ltnet_keras.inference.segment import Segmenter, plan_output_paths
    extras = [key for key, wanted in (("warped_atlas", args.save_warped_atlas),
                                      ("forward_field", args.save_field),
                                      ("aligned", args.save_aligned),
                                      ("alignment", args.save_aligned)) if wanted]
    plans = plan_output_paths(args.image, args.out, args.overwrite, extras)
    options = {"label_interp": args.label_interp, "align": args.align,
               "refine": refine_settings(args)}
    if args.atlases:
        from ltnet_keras.inference.multi_atlas import MultiAtlasSegmenter, atlas_files
        if args.atlas_image or args.atlas_labels:
            raise ValueError("--atlases replaces --atlas-image / --atlas-labels; give one or the "
                             "other")
        root = args.data or load_config(args.run / "config.yaml").data.resolved_root()
        segmenter = MultiAtlasSegmenter(args.run, atlas_files(args.atlases, root),
                                        args.fusion, **options)
    else:
        if args.fusion != "majority":
            raise ValueError("--fusion applies to several atlases (--atlases)")
        segmenter = Segmenter(args.run, atlas_image=args.atlas_image,
                              atlas_labels=args.atlas_labels, **options)
    # Every scan is read and checked before the first output is written, so a bad file in a
    # batch leaves no partial results behind (each scan is read once more to segment it).
    for image in tqdm(args.image, desc="check", disable=len(args.image) < 2):
        segmenter.prepare(image)
    for image, paths in tqdm(list(zip(args.image, plans)), desc="segment",
                             disable=len(args.image) < 2):
        result = segmenter.segment_to_files(image, args.out, args.save_warped_atlas,
                                            args.save_field, args.save_aligned, paths=paths)
        timing = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
        total = sum(result.seconds.values())
        folding = ("" if result.refinement is None else
                   f"; refined field folds {100 * result.refinement.folding_fraction:.3f}%")
        tqdm.write(f"{image} -> {paths['labels']} ({timing}; total {total:.2f}s{folding})")


#: ``--refine-*`` option -> RefineSettings field.
REFINE_OPTIONS = {"refine_levels": "levels", "refine_lr": "learning_rate",
                  "refine_window": "ncc_window", "refine_weight": "regularizer_weight",
                  "refine_smoothing": "smoothing_passes", "refine_diffeomorphic": "diffeomorphic",
                  "refine_tolerance": "tolerance"}


def parse_levels(text: str):
    """``"4:60,2:40"`` -> ``((4, 60), (2, 40))``: (factor, steps) per level, coarse to fine."""
    try:
        return tuple(tuple(int(n) for n in level.split(":", 1)) for level in text.split(","))
    except ValueError:
        raise ValueError(f"--refine-levels {text!r}: expected FACTOR:STEPS pairs separated by "
                         "commas, coarse to fine, e.g. 4:60,2:40 (factors: 1, 2, 4, 8)") from None


def refine_settings(args):
    """The refinement ``--refine`` asks for (its defaults, changed by any ``--refine-*``);
    ``None`` without ``--refine``. A ``--refine-*`` option without ``--refine`` is an error."""
    given = {field: getattr(args, option) for option, field in REFINE_OPTIONS.items()
             if getattr(args, option, None) is not None}
    if not args.refine:
        if given:
            options = ", ".join("--" + o.replace("_", "-") for o in REFINE_OPTIONS
                                if getattr(args, o, None) is not None)
            raise ValueError(f"{options}: these options need --refine")
        return None
    from ltnet_keras.inference.refine import RefineSettings
    if "levels" in given:
        given["levels"] = parse_levels(given["levels"])
    return RefineSettings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_options(p, training=False):
        p.add_argument("--config", type=Path, help="experiment YAML (experiments/configs/...)")
        p.add_argument("--data", type=Path, help="data root with images/, labels/, labels.tsv "
                       "(default $LTNET_DATA or ../shared/data/lpba40)")
        if training:
            p.add_argument("--preset", choices=sorted(PRESETS))
            p.add_argument("--steps", type=int)
            p.add_argument("--seed", type=int)

    p = sub.add_parser("prepare", help="write scans on the network grid (.npz + NIfTI)")
    config_options(p)
    p.add_argument("--subjects", nargs="*")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("select-atlas", help="training scan closest to the pool's average")
    p.add_argument("--data", type=Path)
    p.add_argument("--subjects", nargs="*", help="candidate pool (default: the training pool)")
    p.add_argument("--measure", choices=("ncc", "mse"), default="ncc")
    p.add_argument("--factor", type=int, default=2, help="sub-sampling stride for speed")
    p.set_defaults(func=cmd_select_atlas)

    p = sub.add_parser("evaluate", help="Dice per label / merged structure, Tables 1-5 format")
    p.add_argument("--pred", type=Path, required=True, help="label file or folder")
    p.add_argument("--truth", type=Path, required=True, help="label file or folder")
    p.add_argument("--labels", type=Path, required=True, help="label table TSV")
    p.add_argument("--out", type=Path, help="per-subject CSV")
    p.add_argument("--level", choices=("structure", "label"), default="structure")
    p.add_argument("--name", default="prediction")
    p.add_argument("--per-structure", action="store_true")
    p.add_argument("--strict", action="store_true", help="every truth subject needs a prediction")
    p.add_argument("--unknown-labels", choices=UNKNOWN_LABELS, default="error",
                   help="label ids absent from --labels: refuse the file (default) or score "
                        "them as background, with a warning")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train or resume a run")
    config_options(p, training=True)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("segment", help="segment new scans with a trained run")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--image", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--label-interp", choices=SEGMENT_INTERPOLATIONS)
    p.add_argument("--atlas-image", type=Path, help="override the atlas image path of the run")
    p.add_argument("--atlas-labels", type=Path)
    p.add_argument("--atlases", nargs="+", metavar="ATLAS",
                   help="several labelled atlases, fused: subject ids of the data root (e.g. "
                   "S13 S30 S21) or IMAGE:LABELS pairs; the run's G_F warps each")
    p.add_argument("--fusion", choices=("majority", "jlf"), default="majority",
                   help="how --atlases are fused: majority vote (ties to the atlas most like "
                   "the scan) or joint label fusion (ANTs; needs --align none)")
    p.add_argument("--data", type=Path, help="data root for --atlases ids (default: the run's)")
    p.add_argument("--save-warped-atlas", action="store_true")
    p.add_argument("--save-field", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that exist already (default: refuse)")
    p.add_argument("--align", choices=ALIGN_MODES, default="affine",
                   help="affine (default): reorient, resample and register each scan affinely to "
                   "the atlas (ANTs) and return the labels on the scan's own grid; none: the "
                   "scans already are in the atlas' space")
    p.add_argument("--save-aligned", action="store_true",
                   help="with --align affine, also write the scan in atlas space and its "
                   "alignment (OUT/aligned/) to check them")
    refine = p.add_argument_group(
        "test-time refinement", "refine G_F's forward field on each scan (local NCC + "
        "diffusion, coarse to fine) before warping the atlas labels: a few seconds per scan "
        "for a few Dice points; defaults chosen on the LPBA40 validation subjects")
    refine.add_argument("--refine", action="store_true", help="refine each scan's field")
    refine.add_argument("--refine-levels", metavar="F:S,...",
                        help="FACTOR:STEPS per level, coarse to fine (factor = voxel size in mm "
                        "at 1 mm: 1, 2, 4 or 8); default 8:40,4:30,2:15")
    refine.add_argument("--refine-lr", type=float, help="Adam step, in voxels of each level")
    refine.add_argument("--refine-window", type=float, help="local NCC window (mm)")
    refine.add_argument("--refine-weight", type=float, help="diffusion regulariser weight")
    refine.add_argument("--refine-smoothing", type=int,
                        help="3^3 average-pool passes on the update in every step (0: none)")
    refine.add_argument("--refine-diffeomorphic", action="store_const", const=True,
                        help="optimise a stationary velocity (scaling and squaring)")
    refine.add_argument("--refine-tolerance", type=float,
                        help="stop a level when the loss improves by less than this fraction "
                        "over 10 steps (0: run every step)")
    p.set_defaults(func=cmd_segment)
    return parser


#: The commands that run networks; they start TensorFlow first, with its start-up log filtered.
USES_TENSORFLOW = (cmd_train, cmd_segment)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def print_warning(message, category, filename, lineno, file=None, line=None):
        # One line, like errors: the default format quotes the source line that warned.
        print(f"ltnet {args.command}: warning: {message}", file=sys.stderr)

    set_tensorflow_log_level()
    with warnings.catch_warnings():
        warnings.showwarning = print_warning
        try:
            if args.func in USES_TENSORFLOW:
                start_tensorflow_quietly()
            args.func(args)
        except (VolumeError, ValueError, FileNotFoundError) as error:
            print(f"ltnet {args.command}: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
