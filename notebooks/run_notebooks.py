"""Re-execute the figure notebooks in place, with their outputs, as they are committed.

Each notebook runs top to bottom in a ``python3`` kernel of THIS interpreter (whatever kernels
the machine has), from the ``notebooks/`` folder, and is written back with its outputs (the
figures embedded as PNG) but without per-cell timing metadata, so re-running it changes only
what the figures and printed numbers change. A notebook larger than ``--max-mb`` is refused.

    .venv/bin/python notebooks/run_notebooks.py                      # all three, on results/
    .venv/bin/python notebooks/run_notebooks.py fig4_label_overlays.ipynb
    LTNET_RUN_DIR=runs/table2/ltnet .venv/bin/python notebooks/run_notebooks.py --out /tmp/nb

The notebooks read their runs from environment variables (``LTNET_RUN_DIR``,
``LTNET_VOXELMORPH_RUN_DIR``, ``LTNET_DATAAUG_DIR``; see notebooks/README.md).
"""
import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent
NOTEBOOKS = ("fig3_warped_atlases.ipynb", "fig4_label_overlays.ipynb", "freesurfer_atlas.ipynb")
MAX_MB = 1.5
# The C++ log lines TensorFlow writes to stderr when it starts (absl's "I0000 12:00:00.0 123
# port.cc:153] oneDNN ...", CUDA not found, ...): machine chatter, not something a notebook
# computed, and different on every run. TF_CPP_MIN_LOG_LEVEL does not silence all of them.
TENSORFLOW_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR|[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] .*|To enable the following "
    r"instructions: .*rebuild TensorFlow with the appropriate compiler flags\.)$")


def write_kernel_spec(root) -> Path:
    """A ``python3`` kernel spec under ``root/jupyter`` that runs this interpreter; put the
    returned folder first on ``JUPYTER_PATH`` so the notebooks find it."""
    spec = Path(root) / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ltnet-keras)", "language": "python"}))
    return Path(root) / "jupyter"


def drop_tensorflow_log_lines(notebook) -> int:
    """Remove :data:`TENSORFLOW_LOG_LINE` lines from the cells' stderr outputs (an output left
    empty goes); returns how many lines went. Everything else is kept."""
    dropped = 0
    for cell in notebook.cells:
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = output["text"].splitlines(keepends=True)
                rest = [line for line in lines
                        if not TENSORFLOW_LOG_LINE.match(line.rstrip("\n"))]
                dropped += len(lines) - len(rest)
                if not rest:
                    continue
                output["text"] = "".join(rest)
            kept.append(output)
        if cell.cell_type == "code":
            cell.outputs = kept
    return dropped


def execute_notebook(path, out_path=None, timeout: int = 1800):
    """Run the notebook at ``path`` (kernel ``python3`` from ``JUPYTER_PATH``, working
    directory ``notebooks/``), drop TensorFlow's start-up log lines from its outputs, and write
    it with its outputs to ``out_path`` if given. Returns the executed notebook; a cell that
    raises raises here (``nbclient.CellExecutionError``)."""
    import nbclient
    import nbformat
    notebook = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     record_timing=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    drop_tensorflow_log_lines(notebook)
    if out_path is not None:
        nbformat.write(notebook, str(out_path))
    return notebook


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(NOTEBOOKS),
                        help=f"notebooks in notebooks/ (default: {' '.join(NOTEBOOKS)})")
    parser.add_argument("--out", type=Path,
                        help="write the executed notebooks here instead of in place")
    parser.add_argument("--max-mb", type=float, default=MAX_MB,
                        help=f"refuse a notebook larger than this (default {MAX_MB} MB)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if not (NOTEBOOKS_DIR / n).is_file()]
    if unknown:
        raise SystemExit(f"no such notebooks in {NOTEBOOKS_DIR}: {unknown}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    with tempfile.TemporaryDirectory() as kernels:
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [str(write_kernel_spec(kernels)), os.environ.get("JUPYTER_PATH", "")]).rstrip(
                os.pathsep)
        for name in args.names:
            out = (args.out or NOTEBOOKS_DIR) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"executing {name} -> {out}", flush=True)
            execute_notebook(NOTEBOOKS_DIR / name, out)
            size = out.stat().st_size / 1e6
            print(f"  {size:.2f} MB")
            if size > args.max_mb:
                raise SystemExit(f"{out}: {size:.2f} MB, more than {args.max_mb} MB; make the "
                                 "figure smaller (dpi, fewer subjects) before committing")


if __name__ == "__main__":
    main()
