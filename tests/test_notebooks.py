"""Every notebook runs top to bottom, so none of them rots."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# Notebooks whose point is their plots: how many figures (image/png outputs) a run must show.
EXPECTED_FIGURES = {"core_neurons": 5, "two_models": 2}


def _figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []) if o.output_type in ("display_data", "execute_result"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coreinfer_home: Path) -> None:
    # The session's conversions, not the user's cache (conversion itself is tested in test_convert).
    monkeypatch.setenv("COREINFER_HOME", str(coreinfer_home))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as image/png outputs
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, "\n".join(f"{o.ename}: {o.evalue}" for o in errors)
    if path.stem in EXPECTED_FIGURES:
        assert _figures(nb) == EXPECTED_FIGURES[path.stem]


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS


def test_notebooks_are_saved_without_outputs() -> None:
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code"), path
