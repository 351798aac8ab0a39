"""Re-render the committed tables' Markdown from their CSVs (no training, no scoring): after a
change of wording or layout in ltnet_keras.study.tables, the numbers stay those of the runs.

    python experiments/rerender_tables.py                  # results/table1, 2, 4, 5
    python experiments/rerender_tables.py --results results --tables table1
"""
import argparse
from pathlib import Path

from common import REPO_ROOT, TABLE_ROWS
from ltnet_keras.study.rerender import rerender_structure_table, rerender_table

TABLES = ("table1", "table2", "table4", "table5")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results",
                        help="folder holding <table>/<table>.md, .csv and _subjects.csv")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    args = parser.parse_args(argv)
    for table in args.tables:
        out = args.results / table
        if table == "table4":
            # Table 4's columns are Table 5's rows, beside the paper's Table 4 row of each.
            paper_rows = {label: paper for label, paper in TABLE_ROWS["table5"].values()}
            rerender_structure_table(out, table, paper_rows)
        else:
            rerender_table(out, table)
        print(f"{out / (table + '.md')}: re-rendered")


if __name__ == "__main__":
    main()
