"""Speed and peak memory of segmentation and of training steps, printed as a table.

Each measurement runs in its own subprocess so its peak resident memory (ru_maxrss) is its own.
The machine may be noisy: compare rows of one run, not against old figures.

    python benchmarks/speed.py                       # all measurements, default sizes
    python benchmarks/speed.py --only segment --repeats 5
    python benchmarks/speed.py --only train --train-shape 128 192 128 --factor 4
    python benchmarks/speed.py --only full           # LT-Net step at 160x160x128, or why not

``train`` times the voxelmorph and ltnet presets and, as "before", the ltnet preset on the
straightforward path (``LTNet(fast_path=False)``). ``full`` measures the peak memory of an
ltnet step (``train.recompute_generators`` on, and off) at a few smaller grids, fits
``peak = a + b * voxels`` and runs the full grid only where the fit says it stays under
``--memory-limit-gib``.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _threads(args):
    import ltnet_keras  # noqa: F401  (before TensorFlow: it selects Keras 2)
    import tensorflow as tf
    if args.intra_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)


def _mean_time(fn, repeats):
    fn()  # trace / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times), min(times)


def bench_vxm_forward(args):
    """voxelmorph's own VxmDense (int_steps=0) forward at the full crop: the reference."""
    import ltnet_keras  # noqa: F401
    import numpy as np
    import tensorflow as tf
    import voxelmorph as vxm
    _threads(args)
    from ltnet_keras.config import NetworkConfig
    net = NetworkConfig()
    model = vxm.networks.VxmDense(tuple(args.segment_shape),
                                  [net.enc_features, net.dec_features], int_steps=0)
    x = tf.constant(np.random.rand(1, *args.segment_shape, 1).astype(np.float32))
    forward = tf.function(lambda a, b: model([a, b]), jit_compile=args.jit)
    mean, best = _mean_time(lambda: [t.numpy() for t in forward(x, x)], args.repeats)
    return {"what": "VxmDense forward (voxelmorph 0.2)", "shape": args.segment_shape,
            "mean_s": mean, "min_s": best, "peak_gib": _peak_gib()}


def _make_run(args, tmp, shape, factor, preset, subjects):
    """A run directory with untrained weights (timings do not depend on weight values)."""
    from ltnet_keras.config import config_from_dict
    from ltnet_keras.training import train
    config = config_from_dict({
        "name": "bench", "preset": preset,
        "data": {"atlas": subjects[0], "train_subjects": subjects, "val_subjects": [],
                 "crop_shape": list(shape), "factor": factor},
        "train": {"steps": 0, "seed": 0, "jit_compile": bool(args.jit)}})
    train(config, tmp, verbose=0)
    return config


def bench_segment(args):
    """NIfTI in -> G_F -> label warp on the scan's grid -> NIfTI out, at the full crop."""
    import ltnet_keras  # noqa: F401
    _threads(args)
    from ltnet_keras.config import default_data_root
    from ltnet_keras.inference.segment import Segmenter
    root = default_data_root()
    with tempfile.TemporaryDirectory() as tmp:
        _make_run(args, tmp, args.segment_shape, 1, "voxelmorph", ["S01", "S11"])
        segmenter = Segmenter(tmp, label_interp=args.label_interp, jit_compile=args.jit)
        image = root / "images" / "S12.nii.gz"
        parts = []

        def once():
            parts.append(segmenter.segment_to_files(image, f"{tmp}/out").seconds)
        mean, best = _mean_time(once, args.repeats)
        detail = {k: sum(p[k] for p in parts[1:]) / args.repeats for k in parts[0]}
    return {"what": f"segment one case, NIfTI in/out ({args.label_interp} label warp)",
            "shape": args.segment_shape, "mean_s": mean, "min_s": best, "peak_gib": _peak_gib(),
            "detail": detail}


#: Label channels of LPBA40 (56 structures and background), for synthetic batches.
LPBA40_CHANNELS = 57


def _synthetic_batch(shape, channels=LPBA40_CHANNELS):
    """A random (atlas, one-hot atlas labels, target) batch of one pair on ``shape``."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    labels = rng.integers(0, channels, (1, *shape)).astype(np.int32)
    return {"atlas": tf.constant(rng.random((1, *shape, 1), dtype=np.float32)),
            "atlas_labels": tf.one_hot(labels, channels),
            "atlas_label_index": tf.constant(labels),
            "target": tf.constant(rng.random((1, *shape, 1), dtype=np.float32))}


def _train_name(args) -> str:
    name = f"train step, preset {args.preset}"
    if args.reference:
        name += " (straightforward path)"
    if args.recompute:
        name += " (recompute_generators)"
    return name


def _train_step(args, preset):
    """(run one step of ``preset``, network shape): a compiled train step on a real LPBA40
    pair, or on a synthetic one of ``--network-shape`` (timings and memory do not depend on
    the data)."""
    import ltnet_keras  # noqa: F401
    import tensorflow as tf
    from ltnet_keras.config import apply_preset, config_from_dict
    from ltnet_keras.data.dataset import load_training_data, training_dataset
    from ltnet_keras.training import build_model
    config = config_from_dict({
        "preset": preset,
        "data": {"atlas": "S01", "train_subjects": ["S01", "S11", "S12"],
                 "crop_shape": list(args.train_shape), "factor": args.factor},
        "train": {"jit_compile": bool(args.jit), "recompute_generators": bool(args.recompute)}})
    config = apply_preset(config, preset)
    if args.network_shape:
        shape, batch = tuple(args.network_shape), _synthetic_batch(args.network_shape)
    else:
        data = load_training_data(config.data)
        shape = data.atlas.image.shape
        batch = next(iter(training_dataset(data, 1, 0, 0, 1)))
    model = build_model(config, shape, fast_path=not args.reference)
    step = tf.function(model.train_step, jit_compile=bool(args.jit))
    return (lambda: [v.numpy() for v in step(batch).values()]), shape


def bench_train(args):
    """One training step (G and D updates) of ``--preset``."""
    _threads(args)
    run, shape = _train_step(args, args.preset)
    mean, best = _mean_time(run, args.repeats)
    return {"what": _train_name(args), "shape": list(shape), "mean_s": mean, "min_s": best,
            "peak_gib": _peak_gib()}


def bench_train_pair(args):
    """The step ratio of each of ``--pair-presets`` to voxelmorph with all the models in one
    process, their steps alternating: a load change on a shared machine then hits both sides
    of each ratio alike. Reports each preset's median of the per-round ratios (``--repeats``
    rounds); peak memory is all the models' together, so it is not comparable to the
    single-preset rows."""
    import statistics
    _threads(args)
    runs = {}
    for preset in ("voxelmorph", *args.pair_presets):
        runs[preset], shape = _train_step(args, preset)
        runs[preset]()  # trace / warm up
    seconds = {preset: [] for preset in runs}
    for _ in range(args.repeats):
        for preset, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[preset].append(time.perf_counter() - start)
    detail = {"voxelmorph_mean_s": statistics.mean(seconds["voxelmorph"])}
    for preset in args.pair_presets:
        ratios = [s / v for s, v in zip(seconds[preset], seconds["voxelmorph"])]
        detail.update({f"{preset}_median_ratio": statistics.median(ratios),
                       f"{preset}_min_ratio": min(ratios), f"{preset}_max_ratio": max(ratios),
                       f"{preset}_mean_s": statistics.mean(seconds[preset])})
    last = args.pair_presets[-1]
    return {"what": f"ratio {' / '.join(args.pair_presets)} to voxelmorph step, alternating "
                    "in one process",
            "shape": list(shape), "mean_s": detail[f"{last}_mean_s"],
            "min_s": min(seconds[last]), "peak_gib": _peak_gib(), "detail": detail}


BENCHES = {"vxm_forward": bench_vxm_forward, "segment": bench_segment, "train": bench_train,
           "train_pair": bench_train_pair}


def _child_args(args, name, extra):
    out = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats),
           "--segment-shape", *map(str, args.segment_shape),
           "--train-shape", *map(str, args.train_shape), "--factor", str(args.factor),
           "--intra-threads", str(args.intra_threads), "--inter-threads", str(args.inter_threads)]
    if args.jit:
        out.append("--jit")
    return out + extra


def _run_child(args, name, extra):
    """Run one measurement in a subprocess; its result dict, or None (reason on stderr)."""
    proc = subprocess.run(_child_args(args, name, extra), capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{name} {extra} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    r = json.loads(line[0][len("RESULT "):])
    print(f"{r['what']:<66} {str(tuple(r['shape'])):<16} mean {r['mean_s']:7.3f} s  "
          f"min {r['min_s']:7.3f} s  peak {r['peak_gib']:5.2f} GiB"
          + (f"  {json.dumps({k: round(v, 3) for k, v in r['detail'].items()})}"
             if "detail" in r else ""), flush=True)
    return r


def _voxels(shape) -> int:
    return int(shape[0]) * int(shape[1]) * int(shape[2])


def fit_memory_model(points):
    """Least-squares ``peak_gib = a + b * voxels`` through ``[(voxels, peak_gib), ...]``."""
    n = len(points)
    mean_v = sum(v for v, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    spread = sum((v - mean_v) ** 2 for v, _ in points)
    slope = sum((v - mean_v) * (p - mean_p) for v, p in points) / spread
    return mean_p - slope * mean_v, slope


def scaled_shape(shape, fraction):
    """``shape`` with every side scaled by ``fraction`` (rounded to a multiple of 16, as the
    U-Net's 4 poolings need)."""
    return [max(16, int(round(side * fraction / 16)) * 16) for side in shape]


def bench_full(args):
    """The ltnet step at ``--full-shape``: memory model from smaller grids, then the full grid
    where the model predicts it fits (``--memory-limit-gib``)."""
    full = list(args.full_shape)
    print(f"-- ltnet step at {tuple(full)} ({_voxels(full)} voxels): peak memory model from "
          f"smaller grids", flush=True)
    for recompute in (True, False):
        extra = ["--preset", "ltnet", "--repeats", "1"] + (["--recompute"] if recompute else [])
        points = []
        for fraction in args.model_fractions:
            shape = scaled_shape(full, fraction)
            r = _run_child(args, "train", extra + ["--network-shape", *map(str, shape)])
            if r:
                points.append((_voxels(shape), r["peak_gib"]))
        if len(points) < 2:
            print("not enough points for a memory model")
            continue
        a, b = fit_memory_model(points)
        predicted = a + b * _voxels(full)
        label = "recompute_generators" if recompute else "default (activations kept)"
        print(f"memory model, {label}: peak = {a:.2f} GiB + {b * 1e6:.3f} GiB per million "
              f"voxels -> {predicted:.1f} GiB predicted at {tuple(full)}", flush=True)
        if predicted > args.memory_limit_gib:
            print(f"not run at {tuple(full)}: {predicted:.1f} GiB predicted > "
                  f"--memory-limit-gib {args.memory_limit_gib}", flush=True)
            continue
        r = _run_child(args, "train", extra + ["--network-shape", *map(str, full)])
        if r:
            print(f"full-size ltnet step ({label}): {r['mean_s']:.1f} s, peak "
                  f"{r['peak_gib']:.2f} GiB (model said {predicted:.1f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("segment", "train", "full"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segment-shape", type=int, nargs=3, default=[160, 160, 128])
    parser.add_argument("--train-shape", type=int, nargs=3, default=[160, 192, 160],
                        help="crop before down-sampling by --factor")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["voxelmorph", "ltnet"])
    parser.add_argument("--full-shape", type=int, nargs=3, default=[160, 160, 128],
                        help="the paper's network grid, for the full-size ltnet step")
    parser.add_argument("--model-fractions", type=float, nargs="+", default=[0.5, 0.6, 0.7],
                        help="grid sides (fractions of --full-shape) for the memory model")
    parser.add_argument("--memory-limit-gib", type=float, default=14.0)
    parser.add_argument("--pair-rounds", type=int, default=10,
                        help="rounds of the alternating ratios to voxelmorph (default 10)")
    parser.add_argument("--pair-presets", nargs="+", default=["gan_cyc", "ltnet"],
                        help="presets timed against voxelmorph, alternating (default gan_cyc: "
                             "G_F, G_B and D with the image cycle only, the networks' floor; "
                             "and ltnet)")
    parser.add_argument("--jit", action="store_true", help="XLA jit_compile for the networks")
    parser.add_argument("--intra-threads", type=int, default=0)
    parser.add_argument("--inter-threads", type=int, default=0)
    parser.add_argument("--label-interp", default="linear")
    parser.add_argument("--preset", default="voxelmorph")
    parser.add_argument("--reference", action="store_true",
                        help="(train) the straightforward path, LTNet(fast_path=False)")
    parser.add_argument("--recompute", action="store_true",
                        help="(train) train.recompute_generators")
    parser.add_argument("--network-shape", type=int, nargs=3,
                        help="(train) synthetic pair on this network grid")
    parser.add_argument("--child", choices=tuple(BENCHES))
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(BENCHES[args.child](args)))
        return

    jobs = []
    if args.only in (None, "segment"):
        jobs += [("vxm_forward", []), ("segment", ["--label-interp", "nearest"]),
                 ("segment", ["--label-interp", "linear"])]
    if args.only in (None, "train"):
        jobs += [("train", ["--preset", p]) for p in args.presets]
        if "ltnet" in args.presets:
            jobs.append(("train", ["--preset", "ltnet", "--reference"]))
            jobs.append(("train_pair", ["--pair-presets", *args.pair_presets, "--repeats",
                                        str(max(args.repeats, args.pair_rounds))]))
    results = [r for r in (_run_child(args, name, extra) for name, extra in jobs) if r]
    base = {r["what"]: r["mean_s"] for r in results}
    fwd = base.get("VxmDense forward (voxelmorph 0.2)")
    for r in results:
        if fwd and r["what"].startswith("segment"):
            print(f"ratio {r['what']} / VxmDense forward: {r['mean_s'] / fwd:.2f}")
    vm = base.get("train step, preset voxelmorph")
    for r in results:
        if vm and r["what"].startswith("train step") and "voxelmorph" not in r["what"]:
            print(f"ratio {r['what']} / voxelmorph step: {r['mean_s'] / vm:.2f}")
    for r in results:
        if r["what"].startswith("ratio"):
            d = r["detail"]
            for preset in args.pair_presets:
                print(f"ratio {preset} / voxelmorph step, alternating in one process: median "
                      f"{d[preset + '_median_ratio']:.2f} (min {d[preset + '_min_ratio']:.2f}, "
                      f"max {d[preset + '_max_ratio']:.2f}) over "
                      f"{max(args.repeats, args.pair_rounds)} rounds")
    if args.only in (None, "full"):
        bench_full(args)


if __name__ == "__main__":
    main()
