"""Table 3's files: the multi-atlas rows with their number of atlases and seconds per case,
in the paper's format (``table3.md``), as CSVs (per row, per row and subject) and a box plot."""
import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence

from ltnet_keras import evaluation
from ltnet_keras.records import atomic_write_text, csv_text
from ltnet_keras.study.tables import PAPER_NOTE, PAPER_REFERENCE, VALIDATION_NOTE, Row

TABLE = "table3"


@dataclasses.dataclass
class Table3Row(Row):
    """A row with the number of atlases it uses and its mean seconds per case."""
    atlases: int = 1
    seconds: Optional[float] = None
    seconds_by_subject: dict = dataclasses.field(default_factory=dict)


def _cells(row: Table3Row) -> List[str]:
    s = row.summary
    seconds = "—" if row.seconds is None else f"{row.seconds:.1f}"
    ours = (["—"] * 4 if s is None else
            [f"{s['mean']:.1f} ({s['std']:.1f})", f"{s['min']:.1f}", f"{s['max']:.1f}",
             str(s["n"])])
    ref = PAPER_REFERENCE[TABLE].get(row.paper) if row.paper else None
    paper = ([row.paper, f"{ref[0]:.1f} ({ref[1]:.1f})", f"{ref[2]:.1f}", f"{ref[3]:.1f}"]
             if ref else ["—"] * 4)
    return [row.label, str(row.atlases), seconds, *ours, *paper]


def write_outputs(out: Path, title: str, rows: Sequence[Table3Row], notes: Sequence[str],
                  structure_rows: Sequence[str]) -> str:
    """``table3.md`` (paper format + atlases and s/case), ``table3.csv`` (one line per row),
    ``table3_subjects.csv`` (one line per row and subject) and ``table3_boxplot.png``."""
    header = ["Method", "Atlases", "s/case", "Mean (std)", "Min", "Max", "n",
              "Paper row (CANDI)", "Paper Mean (std)", "Paper Min", "Paper Max"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    scored = {row.label: row.scores for row in rows if row.label in structure_rows}
    text = [f"# {title}", "",
            "Dice (%) on the LPBA40 validation subjects: each subject's mean over the merged "
            "(left/right) structures; Mean (std), Min and Max over subjects (std with ddof=0). "
            "s/case: mean seconds per validation scan on this machine (threads: see the notes); "
            "`table3_dice_seconds.png` plots Dice against them.", "",
            VALIDATION_NOTE, "",
            *lines, "", f"Note: {PAPER_NOTE}", ""]
    text += [f"Note: {n}" for n in notes] + [""]
    text += ["Per structure (mean (std) over subjects):", "", "```",
             evaluation.format_structure_table(scored), "```", ""]
    markdown = "\n".join(text)
    atomic_write_text(out / f"{TABLE}.md", markdown)

    body, per_subject = [], []
    for row in rows:
        s = row.summary
        ref = PAPER_REFERENCE[TABLE].get(row.paper) if row.paper else None
        body.append([row.label, row.atlases, "" if row.seconds is None else f"{row.seconds:.3f}",
                     "structure", s["n"],
                     *[f"{s[k]:.4f}" for k in ("mean", "std", "min", "max")],
                     row.paper or "", *(list(ref) if ref else [""] * 4), row.note])
        for subject in row.scores:
            seconds = row.seconds_by_subject.get(subject.subject)
            per_subject.append([row.label, row.atlases, subject.subject,
                                f"{subject.mean_structure:.6f}", f"{subject.mean_label:.6f}",
                                "" if seconds is None else f"{seconds:.3f}"])
    atomic_write_text(out / f"{TABLE}.csv", csv_text(
        ["method", "atlases", "seconds_per_case", "level", "n", "mean", "std", "min", "max",
         "paper_row", "paper_mean", "paper_std", "paper_min", "paper_max", "note"], body))
    atomic_write_text(out / f"{TABLE}_subjects.csv", csv_text(
        ["method", "atlases", "subject", "mean_structure", "mean_label", "seconds"], per_subject))
    box_plot(out / f"{TABLE}_boxplot.png", rows)
    dice_seconds_plot(out / f"{TABLE}_dice_seconds.png", rows)
    return markdown


def box_plot(path: Path, rows: Sequence[Table3Row]) -> None:
    """Per-subject mean Dice (%) of every row, one box each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=90)
    values = [[100 * s.mean_structure for s in row.scores] for row in rows]
    axes.boxplot(values, whis=(0, 100))
    axes.set_xticks(range(1, len(rows) + 1))
    axes.set_xticklabels([row.label for row in rows], rotation=55, ha="right", fontsize=7)
    axes.set_ylabel("mean Dice over structures (%)")
    axes.set_title("Table 3 (LPBA40 validation subjects)", fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def dice_seconds_plot(path: Path, rows: Sequence[Table3Row]) -> None:
    """Mean Dice (%) against seconds per case (log scale), one point per timed row, ANTs rows
    as squares and ours as circles, k atlases written beside each point."""
    from matplotlib.figure import Figure
    timed = [row for row in rows if row.seconds and row.scores]
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.subplots()
    for row in timed:
        ants = row.label.startswith("ANTs")
        refined = "refine" in row.label
        colour = "tab:grey" if ants else ("tab:red" if refined else "tab:blue")
        if "JLF" in row.label:
            marker = "s" if ants else "D"
        else:
            marker = "^" if ants else "o"
        ax.scatter(row.seconds, row.summary["mean"], c=colour, marker=marker, s=36,
                   edgecolors="black", linewidths=0.4)
        ax.annotate(str(row.atlases), (row.seconds, row.summary["mean"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    handles = [("ANTs SyN (+ majority vote)", "tab:grey", "^"), ("ANTs SyN + JLF", "tab:grey", "s"),
               ("LT-Net G_F (+ majority vote)", "tab:blue", "o"),
               ("G_F + refine (+ majority vote)", "tab:red", "o"),
               ("G_F + refine + JLF", "tab:red", "D")]
    for label, colour, marker in handles:
        ax.scatter([], [], c=colour, marker=marker, s=36, edgecolors="black", linewidths=0.4,
                   label=label)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per case (this machine, same threads for every row; log scale)")
    ax.set_ylabel("mean Dice over merged structures (%)")
    ax.set_title("Table 3: Dice against time (numbers: atlases)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
