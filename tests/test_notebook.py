"""The quickstart notebook runs top to bottom (so it cannot rot)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells)
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in code_cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 4  # curve, samples, inpainting, outliers
    text = "".join(o.get("text", "") for c in code_cells for o in c.get("outputs", []))
    assert "bits/dim" in text and "NDB" in text
    # no warning in a cell's output: a ConvergenceWarning of a capped fit and tqdm's
    # "IProgress not found" were shown to every reader
    stderr = [o.get("text", "") for c in code_cells for o in c.get("outputs", [])
              if o.output_type == "stream" and o.get("name") == "stderr"]
    assert not any("Warning" in t for t in stderr), stderr
