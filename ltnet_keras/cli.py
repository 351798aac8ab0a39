"""``ltnet`` command line: thin wrappers that parse arguments and call the package."""
import argparse
import functools
import sys
import warnings
from pathlib import Path

from ltnet_keras._compat import (end_process_now, set_tensorflow_log_level,
                                 start_tensorflow_quietly)
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
        # Relative to where the user stands, not to the collections folder (config files).
        overrides["data.root"] = str(Path(args.data).absolute())
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


def cmd_cache(args):
    import shutil
    from ltnet_keras._compat import xla_cache_dir
    folder = xla_cache_dir()
    if folder is None:
        print("the XLA program cache is off (LTNET_XLA_CACHE=off)")
        return
    root = folder.parent
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    if args.clear:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root} ({len(files)} files, {size / 1e6:.1f} MB)")
    else:
        print(f"{root}: {len(files)} files (compiled XLA programs, traced definitions), "
              f"{size / 1e6:.1f} MB (this machine and version: {folder.name}); `ltnet cache "
              "--clear` removes them")


def cmd_train(args):
    from ltnet_keras.distribute import WorkerLostError, choose_strategy
    from ltnet_keras.training import train
    config = _config_with_overrides(args)
    # Multi-worker collectives must be set up before TensorFlow runs anything else.
    strategy = choose_strategy(args.strategy, args.cluster, config.train.devices,
                               args.collective_timeout)
    try:
        result = train(config, args.out, strategy=strategy)
    except WorkerLostError as error:
        print(f"ltnet train: error: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"trained {result.steps_done} steps (resumed from {result.resumed_from}) in {args.out}")


def cmd_segment(args):
    from tqdm import tqdm

    from ltnet_keras.inference.cohort import optional_outputs, plan_cohort, read_image_list
    from ltnet_keras.inference.outputs import plan_output_paths
    if args.shard is not None and args.image_list is None:
        raise ValueError("--shard needs --image-list: every task of the array reads the same "
                         "list and takes its share of it")
    scan_outputs = _scan_outputs(args)
    make_segmenter = functools.partial(_make_segmenter, args)   # pickles, for --jobs
    if args.image_list is not None:
        # Cohort: the whole list is checked and planned before any work, in every task alike.
        save_aligned = args.save_aligned and args.align == "affine"
        extras = optional_outputs(args.save_warped_atlas, args.save_field, save_aligned,
                                  args.save_brain_mask)
        images = read_image_list(args.image_list)
        whole = plan_cohort(images, args.out, extras)
        planned = args.shard.take(whole) if args.shard else whole
        status, stopped = _segment_cohort(args, make_segmenter, planned, save_aligned,
                                          scan_outputs)
        if scan_outputs.wanted and not stopped:   # every row of the whole list whose scan is done, any shard
            plans = [paths for _, paths in whole]
            scan_outputs.fill_missing(images, plans)
            scan_outputs.rebuild(images, plans)
        return status
    options = dict(save_warped_atlas=args.save_warped_atlas, save_field=args.save_field,
                   save_aligned=args.save_aligned, save_brain_mask=args.save_brain_mask)
    plans = plan_output_paths(args.image, args.out, args.overwrite, optional_outputs(**options))
    from ltnet_keras.inference.parallel import resolve_jobs
    if resolve_jobs(args.jobs, len(args.image)) > 1:
        return _segment_batch(args, make_segmenter, plans, options, scan_outputs)
    from ltnet_keras.inference.scan_job import segment_and_write
    segmenter = make_segmenter()
    # Every scan of a batch is read and checked before the first output is written, so a bad
    # file leaves no partial results behind (what the check read is kept for segmenting). One
    # scan needs no separate check: segmenting it fails before anything is written.
    if len(args.image) > 1:
        for image in tqdm(args.image, desc="check"):
            segmenter.prepare(image, keep=True)
    for image, paths in tqdm(list(zip(args.image, plans)), desc="segment",
                             disable=len(args.image) < 2):
        tqdm.write(segment_and_write(segmenter, image, paths, options, scan_outputs))
    if scan_outputs.wanted:
        scan_outputs.rebuild(args.image, plans)


def _segment_batch(args, make_segmenter, plans, options, scan_outputs):
    """``--image`` scans with ``--jobs``: worker processes, checked first as in one process."""
    from ltnet_keras.inference.parallel import CohortStopped, segment_batch_in_workers
    try:
        segment_batch_in_workers(make_segmenter, list(zip(args.image, plans)), args.jobs,
                                 options, scan_outputs, lambda line: print(line, flush=True))
    except CohortStopped as error:
        print(f"ltnet segment: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    if scan_outputs.wanted:
        scan_outputs.rebuild(args.image, plans)


def _scan_outputs(args):
    """The record/table/report writer ``--volumes``, ``--qc`` and ``--report`` ask for."""
    from ltnet_keras.data.labels import LabelTable
    from ltnet_keras.inference.qc import MODEL_FILE, QCModel
    from ltnet_keras.inference.scan_records import ScanOutputs
    config = load_config(args.run / "config.yaml") if (args.run / "config.yaml").exists() else None
    tsv = config.data.resolved_labels_tsv() if config else None
    if (args.volumes or args.qc or args.report) and (tsv is None or not tsv.is_file()):
        raise VolumeError(tsv or args.run, "--volumes/--qc/--report need the run's label table "
                          "(names of the labels); set data.root / $LTNET_DATA")
    model = None
    model_path = args.qc_model or args.run / MODEL_FILE
    if args.qc or (args.report and Path(model_path).is_file()):
        if not Path(model_path).is_file():
            raise VolumeError(model_path, "--qc needs a calibrated QC model: this run has none "
                              "(experiments/qc_calibration.py makes one); or give --qc-model")
        model = QCModel.load(model_path)
    protocol = LabelTable.from_tsv(tsv) if tsv is not None and tsv.is_file() else None
    return ScanOutputs(args.out, protocol, args.volumes, args.qc, args.report, model)


def _make_segmenter(args):
    # TensorFlow starts here, where a process first needs it: with --jobs the parent only
    # hands out scans, and its own start-up (~3 s) would come before every worker's.
    start_tensorflow_quietly()
    from ltnet_keras.inference.segment import Segmenter
    from ltnet_keras.data.skull import default_brain_finder
    config_file = args.run / "config.yaml"
    # The data root of the run (or --data); without a run the Segmenter refuses it by name.
    root = args.data or (load_config(config_file).data.resolved_root()
                         if config_file.is_file() else None)
    options = {"label_interp": args.label_interp, "align": args.align,
               "refine": refine_settings(args), "alignment_check": args.alignment_check,
               "brain_finder": None if root is None else default_brain_finder(
                   root, args.skull, args.head_template),
               "measure_qc": bool(args.qc or args.report)}
    if args.atlases:
        from ltnet_keras.inference.multi_atlas import MultiAtlasSegmenter, atlas_files
        if args.atlas_image or args.atlas_labels:
            raise ValueError("--atlases replaces --atlas-image / --atlas-labels; give one or the "
                             "other")
        root = root or load_config(config_file).data.resolved_root()
        return MultiAtlasSegmenter(args.run, atlas_files(args.atlases, root), args.fusion,
                                   **options)
    if args.fusion != "majority":
        raise ValueError("--fusion applies to several atlases (--atlases)")
    return Segmenter(args.run, atlas_image=args.atlas_image, atlas_labels=args.atlas_labels,
                     **options)


def _segment_cohort(args, make_segmenter, planned, save_aligned, scan_outputs):
    """Each scan on its own: a failed one is reported and the rest go on; exit status 1 at
    the end if any failed (``EXIT_SOME_FAILED``). Returns (status, stopped: Ctrl-C or a
    worker died)."""
    from ltnet_keras.inference.cohort import CohortSummary, segment_cohort
    from ltnet_keras.inference.parallel import CohortStopped
    error = None
    summary = CohortSummary(args.shard)
    try:
        summary = segment_cohort(make_segmenter, planned, args.shard,
                                 args.overwrite, args.save_warped_atlas, args.save_field,
                                 save_aligned, args.save_brain_mask, scan_outputs,
                                 report=lambda line: print(line, flush=True),
                                 report_error=lambda line: print(f"ltnet segment: {line}",
                                                                 file=sys.stderr, flush=True),
                                 jobs=args.jobs, summary=summary)
    except CohortStopped as stopped:
        error = stopped
    print(summary.line(), flush=True)
    if error is not None:
        print(f"ltnet segment: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code, True
    return summary.exit_code, False


def _jobs_option(text):
    from ltnet_keras.inference.parallel import parse_jobs
    try:
        return parse_jobs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shard_option(text):
    from ltnet_keras.inference.cohort import parse_shard
    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


#: ``--refine-*`` option -> RefineSettings field.
REFINE_OPTIONS = {"refine_levels": "levels", "refine_lr": "learning_rate",
                  "refine_window": "ncc_window", "refine_weight": "regularizer_weight",
                  "refine_smoothing": "smoothing_passes", "refine_diffeomorphic": "diffeomorphic",
                  "refine_tolerance": "tolerance", "refine_start": "start",
                  "refine_objective": "objective"}


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
    from ltnet_keras.inference.refine import RefineSettings, parse_levels
    if "levels" in given:
        given["levels"] = parse_levels(given["levels"])
    return RefineSettings(**given)


def _head_template_option(text):
    from ltnet_keras.data.skull import parse_head_template
    try:
        return parse_head_template(text)
    except (ValueError, VolumeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    p.add_argument("--unknown-labels", choices=UNKNOWN_LABELS, default="background",
                   help="label ids absent from --labels: score them as background, said once "
                        "per file (default), or refuse the file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("cache", help="the on-disk cache of compiled XLA programs: show or clear",
                       description="Compiled XLA programs (refinement, label transfer) are "
                       "kept between processes in $LTNET_XLA_CACHE (default ~/.cache/ltnet-keras/"
                       "xla; 'off' disables it), one folder per TensorFlow version, package "
                       "version and CPU.")
    p.add_argument("--clear", action="store_true", help="remove every cached program")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train or resume a run")
    config_options(p, training=True)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--strategy", choices=("auto", "mirrored", "multi-worker"), default="auto",
                   help="mirrored: this machine's GPUs (or its CPU); multi-worker: one process "
                   "per machine, the cluster named by TF_CONFIG or --cluster slurm; auto "
                   "(default): multi-worker when TF_CONFIG names a cluster or --cluster slurm "
                   "is given, else mirrored")
    p.add_argument("--cluster", choices=("tf-config", "slurm"), default="tf-config",
                   help="where the workers are listed: the TF_CONFIG variable (default) or the "
                   "SLURM job step (one `ltnet train` per task, started by srun)")
    p.add_argument("--collective-timeout", type=float, metavar="SECONDS",
                   help="multi-worker: fail a step whose gradient exchange takes longer (a "
                   "worker that hangs without dying); longer than a step and the start-up. "
                   "A dead worker is noticed within ~10 s without it")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "segment", help="segment new scans with a trained run",
        description="Segment scans with a trained run. --image: a few scans, all checked "
        "before the first output is written (one bad scan refuses the batch; an existing "
        "output is refused without --overwrite). --image-list: a cohort, each scan on its own "
        "(a bad scan is reported and the rest go on; exit status 1 at the end if any failed; "
        "scans whose outputs exist are skipped without --overwrite, so a re-run resumes), "
        "split over a job array with --shard. Exit status 2: refused before any work.")
    p.add_argument("--run", type=Path, required=True)
    scans = p.add_mutually_exclusive_group(required=True)
    scans.add_argument("--image", type=Path, nargs="+", help="scans to segment")
    scans.add_argument("--image-list", type=Path, metavar="FILE",
                       help="a cohort: one scan path per line (blank lines and lines starting "
                       "with # are skipped; relative paths are relative to FILE's folder); "
                       "every listed file must exist (checked before any work); not with "
                       "--image")
    p.add_argument("--shard", type=_shard_option, metavar="I/N",
                   help="with --image-list: this process segments every N-th listed scan "
                   "from the I-th (0 <= I < N), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_"
                   "COUNT; N tasks together segment the list once, with the names one "
                   "unsharded run gives")
    p.add_argument("--jobs", type=_jobs_option, default="auto", metavar="N",
                   help="segment N scans at once, in N worker processes with one thread "
                   "each (TensorFlow, ITK), each loading the run once; 'auto' (the default): "
                   "one per usable core, as many as the free memory holds at 3 GiB each. "
                   "Never more than the scans to do (one scan: this process, on every core); "
                   "same files as one process. 1: one process using every core. With --shard "
                   "the task's share is split among its N workers")
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
                   help="replace output files that exist already (default: refuse; with "
                   "--image-list, skip the scan)")
    p.add_argument("--align", choices=ALIGN_MODES, default="affine",
                   help="affine (default): reorient, resample and register each scan affinely to "
                   "the atlas (ANTs) and return the labels on the scan's own grid; none: the "
                   "scans already are in the atlas' space")
    p.add_argument("--save-aligned", action="store_true",
                   help="with --align affine, also write the scan in atlas space and its "
                   "alignment (OUT/aligned/) to check them")
    p.add_argument("--alignment-check", choices=("refuse", "warn", "off"), default="refuse",
                   help="with --align affine, every scan's similarity to the atlas once aligned "
                   "(NCC) is checked before any output is written: refuse (default) stops at a "
                   "scan far below the training scans' (not a head, or a header turned wrong) "
                   "and warns about a doubtful one; warn only warns; off checks nothing. "
                   "Thresholds: the run's aligned/alignment_check.json, else defaults")
    p.add_argument("--skull", choices=("auto", "on", "off"), default="auto",
                   help="whole-head scans: auto (default) detects a scan whose skull is still on "
                   "(foreground over 2.3 L) and takes the brain out by registration to a head "
                   "template; on: every scan has its skull; off: scans are skull-stripped")
    p.add_argument("--head-template", type=_head_template_option, nargs="+",
                   metavar="IMAGE:MASK", help="head templates (whole-head image and its brain "
                   "mask); default: subject folders with T1.mgz and brainmask.mgz in the data "
                   "root or in a `freesurfer` folder beside it. Never used for its own scan")
    p.add_argument("--save-brain-mask", action="store_true",
                   help="write the brain mask of each whole-head scan (OUT/brain_mask/)")
    cohort = p.add_argument_group(
        "cohort outputs", "tables rebuilt from every finished scan of the whole list when a "
        "process ends (shards of a job array all write the same complete files)")
    cohort.add_argument("--volumes", type=Path, metavar="FILE.csv",
                        help="one row per scan: subject, mm^3 per label name, total")
    cohort.add_argument("--qc", type=Path, metavar="FILE.csv",
                        help="one row per scan: predicted Dice (mean and per structure), flag "
                        "ok/check, and the signals used")
    cohort.add_argument("--qc-model", type=Path, metavar="FILE",
                        help="calibrated QC model (default: the run's qc_model.json)")
    cohort.add_argument("--report", type=Path, metavar="DIR",
                        help="a picture per scan and DIR/index.html, worst QC first")
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
    refine.add_argument("--refine-start", choices=("network", "zero"),
                        help="start from G_F's field (and G_B's, for ltnet), the default, or "
                        "from the identity")
    refine.add_argument("--refine-objective", choices=("plain", "ltnet"),
                        help="plain (default): NCC + diffusion on the forward field; ltnet: "
                        "forward and backward fields together with NCC both ways and the "
                        "cycle terms of Eq. 7-8: ~4x the time for +0.1-0.2 Dice and half the "
                        "folds (README, results/refine_ltnet)")
    p.set_defaults(func=cmd_segment)
    return parser


#: The commands that run networks; they start TensorFlow first, with its start-up log filtered
#: (``segment`` in :func:`_make_segmenter`, in the processes that segment).
USES_TENSORFLOW = (cmd_train,)


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
            # A command may return a status of its own: segment --image-list returns 1 when
            # some scans of the cohort failed and the others were done.
            status = args.func(args)
        except (VolumeError, ValueError, FileNotFoundError) as error:
            print(f"ltnet {args.command}: error: {error}", file=sys.stderr)
            return 2
        except Exception as error:
            # TensorFlow fails (rather than recompiles) on a damaged cached program, e.g. one
            # cut short when a job was killed while writing it: say where and what to do.
            from ltnet_keras._compat import xla_cache_dir
            if type(error).__name__ in ("OutOfRangeError", "DataLossError") and xla_cache_dir():
                print(f"ltnet {args.command}: error: {type(error).__name__}: {error}. A compiled "
                      f"program in the XLA cache {xla_cache_dir()} may be damaged; `ltnet cache "
                      "--clear` removes the cache (or set LTNET_XLA_CACHE=off)", file=sys.stderr)
                return 2
            raise
    return status or 0


#: Commands after which the ``ltnet`` command ends without the interpreter's teardown.
LEAVES_AT_ONCE = ("segment",)


def run() -> None:
    """The ``ltnet`` command (``console_scripts``): :func:`main` on ``sys.argv``. After
    ``segment`` the process ends as soon as its status is known: every output is written and
    closed by then, and unloading TensorFlow's ~3000 modules and stopping its threads took
    another 0.55 s of a one-scan command (``benchmarks/README.md``, issue 28)."""
    status = main()
    if sys.argv[1:2] and sys.argv[1] in LEAVES_AT_ONCE:
        end_process_now(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
