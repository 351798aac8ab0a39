"""Both figure notebooks execute top to bottom (in this interpreter) and draw their figures.

No finished run is given, so the first notebook trains the tiny fallback run (20 steps on two
subjects at the 32x48x32 grid) and the second one reuses it.
"""
import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def kernel_env(lpba40_root, tmp_path_factory):
    """A ``python3`` kernel spec running this very interpreter, found first on JUPYTER_PATH, so
    the notebooks run in the project's environment whatever kernels the machine has."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("notebooks")
    spec = root / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ltnet-keras)", "language": "python"}))
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", str(root / "jupyter"))
    patch.setenv("LTNET_RUN_DIR", str(root / "no_such_run"))
    patch.setenv("LTNET_FALLBACK_RUN_DIR", str(root / "tiny_run"))
    patch.setenv("LTNET_DATA", str(lpba40_root))
    patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    yield root
    patch.undo()


def _execute(name):
    import nbclient
    import nbformat
    path = NOTEBOOKS / name
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{name}: commit the notebook with its outputs cleared"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return notebook, outputs


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("fig3_warped_atlases.ipynb", "Warped atlases"),
    ("fig4_label_overlays.ipynb", "Label overlays"),
])
def test_notebook_executes_and_draws(kernel_env, name, expected):
    notebook, outputs = _execute(name)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "is not a finished training run" in text  # the fallback message is shown
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    assert (kernel_env / "tiny_run" / "figures" / f"{Path(name).stem}.png").exists()
    assert expected in notebook.cells[-1].source
