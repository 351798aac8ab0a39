"""Table 4: Dice of each brain structure for every method of Table 5 (Sec. 6.5).

The rows are Table 5's (experiments/table5_sota.py, configs in experiments/configs/table5/):
atlas labels without registration, VoxelMorph, DataAug, LT-Net (paper weights), LT-Net
(recipe) and the U-Net upper bound. They live in Table 5's output folder (--table5, default
runs/table5): finished rows are read back from their per-subject scores, missing ones are
trained there first (the same arguments as table5_sota.py: --rows, --runs, --smoke, --set, ...).

Writes in --out: table4.md / table4.csv (mean (std) over the validation subjects of each merged
LPBA40 structure, per method; the few structures CANDI also has beside the paper's numbers),
table4_structures.png (structures on x, one bar per method) and provenance.json.

    python experiments/table4_structures.py --table5 runs/table5 --out runs/table4
    python experiments/table4_structures.py --smoke --table5 /tmp/smoke/table5 \\
        --out /tmp/smoke/table4
"""
from pathlib import Path

import numpy as np

import table5_sota
from common import REPO_ROOT, write_provenance, write_structure_table
from ltnet_keras import evaluation

TABLE = "table4"
BARS = "table4_structures.png"
NOTE = ("Rows are Table 5's (same runs, same validation subjects); see table5.md for how DataAug "
        "and the U-Net upper bound are made.")


def bar_chart(results, out_path: Path, title: str) -> Path:
    """Grouped bars: merged structures on x, one bar (mean over subjects, std as a whisker) per
    method."""
    from matplotlib.figure import Figure
    summaries = {method: evaluation.structure_summary(scores) for method, scores in results.items()}
    structures = []
    for summary in summaries.values():
        structures += [name for name in summary if name not in structures]
    n_methods = len(summaries)
    width = 0.8 / n_methods
    x = np.arange(len(structures))
    fig = Figure(figsize=(min(24.0, 3.0 + 0.13 * len(structures) * max(n_methods, 2)), 5.5))
    ax = fig.subplots()
    for k, (method, summary) in enumerate(summaries.items()):
        means = [summary.get(name, {}).get("mean", np.nan) for name in structures]
        stds = [summary.get(name, {}).get("std", np.nan) for name in structures]
        ax.bar(x + (k - (n_methods - 1) / 2) * width, means, width, yerr=stds, label=method,
               capsize=1.5, error_kw={"elinewidth": 0.6})
    ax.set_xticks(x)
    ax.set_xticklabels(structures, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(structures) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("Dice (%), mean over subjects")
    ax.set_title(title, pad=26)
    ax.legend(fontsize=8, ncol=n_methods, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path


def main(argv=None):
    parser = table5_sota.build_table5_parser(__doc__, name=TABLE)
    parser.describe_output("out", "where table4.md / .csv / .png and provenance.json go")
    parser.describe("runs", "finished registration runs to use instead of training (ROW in "
                            "voxelmorph ltnet ltnet_tuned); copied to <table5>/<ROW>/")
    parser.add_output("--table5", REPO_ROOT / "runs" / "table5",
                      "Table 5's output folder: its rows are read back from there, or trained "
                      "there if missing")
    args = parser.parse_args(argv)
    out = args.out
    args.out = args.table5
    result = table5_sota.collect(args)
    results = result.labelled()
    paper_rows = {table5_sota.LABELS[r][0]: table5_sota.LABELS[r][1] for r in result.rows}
    grid = next(iter(result.configs.values())).data.network_shape
    title = (f"Table 4: Dice per structure — atlas {result.atlas}, {len(result.baseline)} "
             f"validation subjects, network grid {grid}")
    markdown = write_structure_table(out, TABLE, title, results, paper_rows, [NOTE])
    bar_chart(results, out / BARS, title)
    write_provenance(out, TABLE, result.configs, result.overrides, {
        "segnet_overrides": result.segnet_overrides, "table5_dir": str(args.table5),
        "run_dirs": {r: str(d) for r, d in result.run_dirs.items()}, "atlas": result.atlas})
    print(markdown)
    return result


if __name__ == "__main__":
    main()
