"""Seconds per training step and peak resident memory of the paper-scale configs.

Each config runs in a fresh process (its peak is its own): its LT-Net is built on the config's
grid (160x160x128 at full resolution for experiments/configs/paper_scale/) and trained for
--warmup untimed steps and --steps timed ones on a random pair, batch 1, one replica. A
process whose resident memory passes --memory-limit-gib is stopped and recorded as such.

    python benchmarks/paper_scale_memory.py --out results/paper_scale
    python benchmarks/paper_scale_memory.py --enc 4 4 4 4 --dec 4 4 4 4 4 4 4 --disc 4 4 4 4
    python benchmarks/paper_scale_memory.py --set train.recompute_generators=false
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "experiments" / "configs" / "paper_scale" / name
           for name in ("ltnet_paper.yaml", "ltnet_recipe.yaml")]


def parse_set(items):
    """``KEY=VALUE`` (VALUE as YAML: ``false``, ``3``, ``[4, 4]``) -> {KEY: value}."""
    import yaml
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=3")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, default=CONFIGS,
                        help="config files (default: experiments/configs/paper_scale/*.yaml)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (default 2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first; the first traces the graph (default 1)")
    parser.add_argument("--label-channels", type=int, default=57,
                        help="one-hot label channels of the random pair (LPBA40: 57)")
    parser.add_argument("--enc", type=int, nargs="+", help="reduced encoder channels")
    parser.add_argument("--dec", type=int, nargs="+", help="reduced decoder channels")
    parser.add_argument("--disc", type=int, nargs="+", help="reduced discriminator channels")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="other config overrides")
    parser.add_argument("--memory-limit-gib", type=float, default=18.0,
                        help="stop a config whose process passes this (default 18)")
    parser.add_argument("--out", type=Path, help="write paper_scale.json and .md here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import ltnet_keras  # noqa: F401  (before TensorFlow: it selects Keras 2)
    from ltnet_keras.study import paper_scale

    if args.child:
        from ltnet_keras._compat import start_tensorflow_quietly
        from ltnet_keras.config import load_config
        start_tensorflow_quietly()
        config = load_config(args.child, json.loads(args.overrides))
        report = paper_scale.run_training_steps(config, args.steps, args.warmup,
                                                args.label_channels)
        print(paper_scale.report_line(report), flush=True)
        return

    overrides = dict(paper_scale.channel_overrides(args.enc, args.dec, args.disc),
                     **parse_set(args.set))
    rows = []
    for config in args.configs:
        command = [sys.executable, __file__, "--child", str(config), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--label-channels", str(args.label_channels),
                   "--overrides", json.dumps(overrides)]
        result = paper_scale.measure_in_fresh_process(command, args.memory_limit_gib)
        shown = config.resolve().relative_to(REPO) if config.resolve().is_relative_to(REPO) \
            else config.name
        row = dict(result, config=str(shown), overrides=overrides)
        rows.append(row)
        report = result["report"] or {}
        print(f"{shown}: {result['status']}, steps {report.get('step_seconds')} s "
              f"(warm-up {report.get('warmup_seconds')}), peak {result['peak_gib']:.2f} GiB "
              f"{result['error']}", flush=True)
    record = {"command": "python benchmarks/paper_scale_memory.py "
                         + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "steps": args.steps, "warmup": args.warmup, "label_channels": args.label_channels,
              "memory_limit_gib": args.memory_limit_gib, "seed": 0, "rows": rows,
              "environment": paper_scale.environment()}
    if args.out:
        from ltnet_keras.records import atomic_write_text
        atomic_write_text(args.out / "paper_scale.json", json.dumps(record, indent=2) + "\n")
        atomic_write_text(args.out / "paper_scale.md", paper_scale.results_markdown(record))
        print(f"wrote {args.out / 'paper_scale.json'} and .md")
    if any(row["status"] == "failed" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
