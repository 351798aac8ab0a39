"""Speed and peak memory of segmentation and of training steps, printed as a table.

Each measurement runs in its own subprocess so its peak resident memory (ru_maxrss) is its own.
The machine may be noisy: compare rows of one run, not against old figures.

    python benchmarks/speed.py                       # all measurements, default sizes
    python benchmarks/speed.py --only segment --repeats 5
    python benchmarks/speed.py --only train --train-shape 128 192 128 --factor 4
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
    from ltnet_keras.segment import Segmenter
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


def bench_train(args):
    """One training step (G and D updates) of a preset on a real LPBA40 pair."""
    import ltnet_keras  # noqa: F401
    _threads(args)
    import tensorflow as tf
    from ltnet_keras.config import apply_preset, config_from_dict
    from ltnet_keras.data.dataset import load_training_data, training_dataset
    from ltnet_keras.training import build_model
    config = config_from_dict({
        "preset": args.preset,
        "data": {"atlas": "S01", "train_subjects": ["S01", "S11", "S12"],
                 "crop_shape": list(args.train_shape), "factor": args.factor},
        "train": {"jit_compile": bool(args.jit)}})
    config = apply_preset(config, args.preset)
    data = load_training_data(config.data)
    model = build_model(config, data.atlas.image.shape)
    batch = next(iter(training_dataset(data, 1, 0, 0, 1)))
    step = tf.function(model.train_step, jit_compile=bool(args.jit))
    mean, best = _mean_time(lambda: [v.numpy() for v in step(batch).values()], args.repeats)
    return {"what": f"train step, preset {args.preset}", "shape": list(data.atlas.image.shape),
            "mean_s": mean, "min_s": best, "peak_gib": _peak_gib()}


BENCHES = {"vxm_forward": bench_vxm_forward, "segment": bench_segment, "train": bench_train}


def _child_args(args, name, extra):
    out = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats),
           "--segment-shape", *map(str, args.segment_shape),
           "--train-shape", *map(str, args.train_shape), "--factor", str(args.factor),
           "--intra-threads", str(args.intra_threads), "--inter-threads", str(args.inter_threads)]
    if args.jit:
        out.append("--jit")
    return out + extra


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("segment", "train"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segment-shape", type=int, nargs=3, default=[160, 160, 128])
    parser.add_argument("--train-shape", type=int, nargs=3, default=[160, 192, 160],
                        help="crop before down-sampling by --factor")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["voxelmorph", "ltnet"])
    parser.add_argument("--jit", action="store_true", help="XLA jit_compile for the networks")
    parser.add_argument("--intra-threads", type=int, default=0)
    parser.add_argument("--inter-threads", type=int, default=0)
    parser.add_argument("--label-interp", default="linear")
    parser.add_argument("--preset", default="voxelmorph")
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
    results = []
    for name, extra in jobs:
        proc = subprocess.run(_child_args(args, name, extra), capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name} {extra} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[0][len("RESULT "):]))
        r = results[-1]
        print(f"{r['what']:<58} {str(tuple(r['shape'])):<16} mean {r['mean_s']:7.3f} s  "
              f"min {r['min_s']:7.3f} s  peak {r['peak_gib']:5.2f} GiB"
              + (f"  {json.dumps({k: round(v, 3) for k, v in r['detail'].items()})}"
                 if "detail" in r else ""), flush=True)
    base = {r["what"]: r["mean_s"] for r in results}
    fwd = base.get("VxmDense forward (voxelmorph 0.2)")
    for r in results:
        if fwd and r["what"].startswith("segment"):
            print(f"ratio {r['what']} / VxmDense forward: {r['mean_s'] / fwd:.2f}")
    vm = base.get("train step, preset voxelmorph")
    for r in results:
        if vm and r["what"].startswith("train step") and "voxelmorph" not in r["what"]:
            print(f"ratio {r['what']} / voxelmorph step: {r['mean_s'] / vm:.2f}")


if __name__ == "__main__":
    main()
