"""The figure notebooks: the committed copies carry their figures, made from the committed
runs; the two LPBA40 figure notebooks also execute top to bottom here (in this interpreter) and
draw them. The FreeSurfer notebook needs its committed run and the full-size FreeSurfer scans
(a refined 256^3 segmentation: a minute or more), so only its committed copy is checked.

The executed runs get no finished run, so the first notebook trains the tiny fallback run (20
steps on two subjects at the 32x48x32 grid) and the second one reuses it; DataAug's column is
fed the manual labels themselves, so its Dice must be 100 %.
"""
import base64
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import run_notebooks  # noqa: E402  (notebooks/run_notebooks.py)

EXPECTED_TITLE = {"fig3_warped_atlases.ipynb": "Warped atlases",
                  "fig4_label_overlays.ipynb": "Label overlays"}
#: The committed run each committed notebook was made from.
MADE_FROM = {"fig3_warped_atlases.ipynb": "results/recipe/ltnet",
             "fig4_label_overlays.ipynb": "results/recipe/ltnet",
             "freesurfer_atlas.ipynb": "results/freesurfer/ltnet"}


def _outputs(notebook):
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]


def _text(outputs):
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _images(outputs):
    return [base64.b64decode(o["data"]["image/png"]) for o in outputs
            if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("name", run_notebooks.NOTEBOOKS)
def test_committed_notebook_shows_its_figure(name):
    nbformat = pytest.importorskip("nbformat")
    path = NOTEBOOKS / name
    notebook = nbformat.read(path, as_version=4)
    outputs = _outputs(notebook)
    images = _images(outputs)
    assert len(images) == 1, f"{name}: commit it executed (notebooks/run_notebooks.py)"
    assert images[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert not [o for o in outputs if o.output_type == "error"]
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # top to bottom
    assert path.stat().st_size < run_notebooks.MAX_MB * 1e6
    # Made from the committed runs, not from the fallback.
    assert "is not a finished training run" not in _text(outputs)
    assert MADE_FROM[name] in _text(outputs)


def test_tensorflow_start_up_lines_are_dropped_and_nothing_else():
    nbformat = pytest.importorskip("nbformat")
    from nbformat.v4 import new_code_cell, new_notebook, new_output
    chatter = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
               "STDERR\nI0000 00:00:1795715201.931255    3367 port.cc:153] oneDNN custom "
               "operations are on.\n")
    cuda = ("E0000 00:00:1795715213.708115    3367 cuda_platform.cc:52] failed call to cuInit: "
            "INTERNAL\n")
    notebook = new_notebook(cells=[new_code_cell("x", outputs=[
        new_output("stream", name="stderr", text=chatter),
        new_output("stream", name="stdout", text=cuda),  # stdout is never touched
        new_output("stream", name="stderr", text=cuda + "UserWarning: a real one\n")])])
    assert run_notebooks.drop_tensorflow_log_lines(notebook) == 3
    outputs = notebook.cells[0].outputs
    assert [(o.name, o.text) for o in outputs] == [("stdout", cuda),
                                                   ("stderr", "UserWarning: a real one\n")]
    nbformat.validate(notebook)


@pytest.fixture(scope="module")
def kernel_env(lpba40_root, tmp_path_factory):
    """Kernel ``python3`` = this interpreter; no finished run anywhere; DataAug's "results"
    are the manual labels of the held-out subjects."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("notebooks")
    dataaug = root / "dataaug"
    dataaug.mkdir()
    for subject in ("S31", "S32", "S33"):
        (dataaug / f"{subject}.nii.gz").symlink_to(lpba40_root / "labels" / f"{subject}.nii.gz")
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", str(run_notebooks.write_kernel_spec(root)))
    patch.setenv("LTNET_RUN_DIR", str(root / "no_such_run"))
    patch.setenv("LTNET_VOXELMORPH_RUN_DIR", str(root / "no_such_run"))
    patch.setenv("LTNET_DATAAUG_DIR", str(dataaug))
    patch.setenv("LTNET_FALLBACK_RUN_DIR", str(root / "tiny_run"))
    patch.setenv("LTNET_FIGURE_DIR", str(root / "figures"))
    patch.setenv("LTNET_DATA", str(lpba40_root))
    patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    yield root
    patch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_TITLE))
def test_notebook_executes_and_draws(kernel_env, name):
    notebook = run_notebooks.execute_notebook(NOTEBOOKS / name, timeout=600)
    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.output_type == "error"]
    text = _text(outputs)
    assert "is not a finished training run" in text  # the fallback message is shown
    assert len(_images(outputs)) == 1
    assert (kernel_env / "figures" / f"{Path(name).stem}.png").exists()
    assert EXPECTED_TITLE[name] in notebook.cells[-1].source
    if name.startswith("fig3"):
        # The tiny LT-Net run leaves backward_generator.h5: G_B comes from there and the
        # reconstructed-atlas row is drawn.
        assert "G_B from backward_generator.h5" in text and "mean |a_hat - a|" in text
    else:
        assert text.count("DataAug 100.0") == 3  # the manual labels score 100 % against themselves
