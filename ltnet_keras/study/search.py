"""A recipe search: many training settings on one grid, budget and seed, each scored on the
validation subjects against a VoxelMorph twin, collected in one table.

Each setting is one YAML (an :class:`ExperimentConfig`); its run directory is trained (or
resumed), its validation subjects are segmented and scored (Dice over merged structures, with
the folding statistics of each forward field), and its row (what changed with respect to the
paper's LT-Net, Dice, difference to the twin, field magnitude, folding, D's loss, the weakest
term's pull on the field, wall time) is written to ``row.json`` beside the small artefacts of
the run (config, versions, history, curves, scores) in the results folder. A finished row is
read back, not recomputed, so a search can span several sittings.
"""
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ltnet_keras.config import ExperimentConfig, apply_preset, flat_config, load_config
from ltnet_keras.records import atomic_write_text, csv_text

#: What a row reports, in table order.
COLUMNS = ("setting", "changes", "steps", "dice_mean", "dice_std", "twin", "vs_twin",
           "field_magnitude", "folding_percent", "log_jacobian_std", "discriminator_loss",
           "weakest_term", "weakest_ratio", "train_seconds")
#: Run-directory files copied next to the row (all small; no weights, no volumes).
ARTEFACTS = ("config.yaml", "environment.json", "atlas.json", "history.csv", "loss_curve.png",
             "results.md", "summary.csv")
# Settings that only bookkeep or log; they are not "what changed".
_NOT_A_CHANGE = {"train.steps", "train.log_every", "train.checkpoint_every", "train.devices",
                 "train.log_grad_norms", "train.jit_compile", "name", "preset", "segment.label_interp"}


def describe_changes(config: ExperimentConfig) -> str:
    """The objective and schedule settings of ``config`` that differ from its preset (for the
    ``ltnet`` preset: from the paper's Eq. (11)), e.g. ``"weights.gan=0, penalties.trans_eps=0.5"``;
    data settings are shared by a whole search and left out."""
    reference = flat_config(apply_preset(ExperimentConfig(), config.preset))
    ours = flat_config(config)
    changes = [f"{key}={_short(value)}" for key, value in ours.items()
               if key not in _NOT_A_CHANGE and not key.startswith("data.")
               and reference.get(key) != value]
    prefix = "" if config.preset == "ltnet" else f"preset {config.preset}"
    if not changes:
        return prefix or "none (the paper's Eq. 11)"
    return ", ".join(([prefix] if prefix else []) + changes)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and "/" in value:
        return Path(value).name
    return str(value)


def generator_steps(config: ExperimentConfig) -> int:
    """G_F's total updates: this run's steps plus those of the run it starts from."""
    steps = config.train.steps
    if config.train.init_from:
        steps += generator_steps(load_config(Path(config.train.init_from) / "config.yaml"))
    return steps


def is_voxelmorph_twin(config: ExperimentConfig) -> bool:
    """The plain ``voxelmorph`` preset from scratch (sim + 1 smooth, nothing else)."""
    reference = apply_preset(config, "voxelmorph")
    return (config.weights == reference.weights and not config.train.init_from
            and config.train.ramp_steps == 0)


def final_history_row(run_dir: Path) -> Dict[str, float]:
    from ltnet_keras.training import read_history
    rows = read_history(run_dir / "history.csv")
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


def term_pulls(history_row: Dict[str, float]) -> Dict[str, float]:
    """Each active term's pull on the forward field relative to L_sim's, ``grad_<term> /
    grad_sim`` (empty without gradient-norm columns)."""
    sim = history_row.get("grad_sim")
    return {key[len("grad_"):]: value / sim for key, value in history_row.items()
            if key.startswith("grad_") and key != "grad_sim"} if sim else {}


def weakest_term(history_row: Dict[str, float]):
    """The active term with the smallest :func:`term_pulls` at the last logged step:
    ``(name, ratio)`` or ``("", nan)``."""
    ratios = term_pulls(history_row)
    if not ratios:
        return "", float("nan")
    name = min(ratios, key=ratios.get)
    return name, ratios[name]


def run_setting(config: ExperimentConfig, run_dir, results_dir, verbose: int = 2) -> dict:
    """Train, score and record one setting; returns its row (without the twin columns)."""
    from ltnet_keras import evaluation
    from ltnet_keras.study.experiment import report, segment_and_score
    from ltnet_keras.training import FORWARD_WEIGHTS, train, train_seconds
    run_dir, results_dir = Path(run_dir), Path(results_dir)
    row_path = results_dir / "row.json"
    if row_path.exists():
        return json.loads(row_path.read_text())
    result = train(config, run_dir, verbose=verbose)
    interp = config.segment.label_interp
    scores = segment_and_score(run_dir, config, list(config.data.val_subjects), interp)
    method = f"{config.name}_{interp}"
    report(run_dir, {method: scores},
           f"{config.name}: {result.steps_done} steps, atlas {result.data.atlas.subject}, "
           f"network grid {config.data.network_shape}")
    summary = evaluation.summarise(scores)
    final = final_history_row(run_dir)
    weakest, ratio = weakest_term(final)
    row = {"setting": config.name, "changes": describe_changes(config),
           "steps": generator_steps(config), "dice_mean": summary["mean"],
           "dice_std": summary["std"], "twin": "", "vs_twin": float("nan"),
           "field_magnitude": final.get("field_magnitude", float("nan")),
           "folding_percent": summary.get("folding_percent", float("nan")),
           "log_jacobian_std": summary.get("log_jacobian_std", float("nan")),
           "discriminator_loss": final.get("discriminator", float("nan")),
           "weakest_term": weakest, "weakest_ratio": ratio,
           # 0 for a run finished before training kept its clock
           "train_seconds": train_seconds(run_dir) or 0.0,
           "is_voxelmorph_twin": is_voxelmorph_twin(config)}
    results_dir.mkdir(parents=True, exist_ok=True)
    # A twin's G_F (1.3 MB) is kept: rows that start from it (train.init_from) and
    # `ltnet segment --run` can use the results folder itself.
    kept = (FORWARD_WEIGHTS,) if row["is_voxelmorph_twin"] else ()
    for name in ARTEFACTS + (f"scores_{method}.csv",) + kept:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, results_dir / name)
    atomic_write_text(row_path, json.dumps(row, indent=2))
    return row


def attach_twins(rows: Sequence[dict]) -> List[dict]:
    """Fill ``twin`` / ``vs_twin``: each row against the VoxelMorph twin of its G_F budget."""
    twins = {row["steps"]: row for row in rows if row.get("is_voxelmorph_twin")}
    out = []
    for row in rows:
        row = dict(row)
        twin = twins.get(row["steps"])
        if twin is not None:
            row["twin"] = twin["setting"]
            row["vs_twin"] = row["dice_mean"] - twin["dice_mean"]
        out.append(row)
    return out


def _cell(value, digits=2) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per setting, in the order given."""
    header = ("| setting | what changed (vs. the paper's Eq. 11) | G_F steps | val Dice mean (std) "
              "| vs twin | field (vox) | fold % | sd log det J | D loss | weakest term / sim | "
              "train min |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        weakest = (f"{row['weakest_term']} {row['weakest_ratio']:.3f}"
                   if row["weakest_term"] else "-")
        lines.append(
            f"| {row['setting']} | {row['changes']} | {row['steps']} | "
            f"{row['dice_mean']:.1f} ({row['dice_std']:.1f}) | "
            f"{_cell(row['vs_twin'], 1) if row['twin'] else '-'} | "
            f"{_cell(row['field_magnitude'], 3)} | {_cell(row['folding_percent'], 3)} | "
            f"{_cell(row['log_jacobian_std'], 3)} | {_cell(row['discriminator_loss'], 3)} | "
            f"{weakest} | {row['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def plot_dice(rows: Sequence[dict], path) -> None:
    """Horizontal bars of val Dice per setting (error bar: std over subjects), the twins'
    Dice as dashed lines."""
    import os

    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 0.35 * len(rows) + 1.5))
    ax = fig.subplots()
    names = [row["setting"] for row in rows][::-1]
    means = [row["dice_mean"] for row in rows][::-1]
    stds = [row["dice_std"] for row in rows][::-1]
    colours = ["tab:grey" if row.get("is_voxelmorph_twin") else "tab:blue" for row in rows][::-1]
    ax.barh(names, means, xerr=stds, color=colours, capsize=2)
    for row in rows:
        if row.get("is_voxelmorph_twin"):
            ax.axvline(row["dice_mean"], linestyle="--", color="black", linewidth=0.8)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_xlim(max(0.0, low - 3.0), max(m + s for m, s in zip(means, stds)) + 2.0)
    ax.set_xlabel("val Dice (%, merged structures, S31-S40)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def write_search_table(rows: Sequence[dict], out_dir, title: str, notes: str = "") -> str:
    """``table.md``, ``table.csv`` and ``dice.png`` in ``out_dir``; returns the Markdown."""
    out_dir = Path(out_dir)
    rows = attach_twins(rows)
    text = "\n".join([f"# {title}", "", notes, "", format_table(rows), ""])
    atomic_write_text(out_dir / "table.md", text)
    atomic_write_text(out_dir / "table.csv", csv_text(
        COLUMNS, [[_cell(row[c], 4) if isinstance(row[c], float) else row[c] for c in COLUMNS]
                  for row in rows]))
    plot_dice(rows, out_dir / "dice.png")
    return text


def run_search(config_paths: Sequence, runs_dir, out_dir, overrides: Optional[dict] = None,
               title: str = "Recipe search", notes: str = "", verbose: int = 2) -> List[dict]:
    """Every setting in order (finished ones are read back), then the table."""
    rows = []
    for path in config_paths:
        config = load_config(path, dict(overrides or {}))
        row = run_setting(config, Path(runs_dir) / config.name, Path(out_dir) / config.name,
                          verbose=verbose)
        # Described afresh from the config, so a finished row reads like the others.
        row["changes"] = describe_changes(config)
        rows.append(row)
        write_search_table(rows, out_dir, title, notes)
    return rows
