"""Every notebooks/*.ipynb executes in quick mode without errors and is in sync with its percent-format .py."""

import os
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _sources(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells if c.source.strip()]


def test_notebooks_present():
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_design_space", "02_paper_claims"} <= names
    # the .py (percent format) is the source of truth: every one has its .ipynb and vice versa
    assert names == {p.stem for p in NOTEBOOK_DIR.glob("*.py")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_in_sync_with_py(path):
    jupytext = pytest.importorskip("jupytext")
    py = path.with_suffix(".py")
    assert py.is_file(), f"{path.name} has no paired {py.name}"
    assert _sources(jupytext.read(path)) == _sources(jupytext.read(py)), (
        f"{path.name} is out of sync with {py.name}: run `jupytext --sync {py}`")
    nb = jupytext.read(path)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_in_quick_mode(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MOBALAB_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")
    if path.stem == "02_paper_claims":
        assert text.count("Verdict") == 4, text
    if path.stem == "03_kernel_needles":  # the transformers section: dense when top-k covers every block
        logits = {int(k): float(x) for k, x in re.findall(r"top_k +(\d+) of 16 blocks: logits differ from SDPA's by "
                                                          r"(\S+) \(relative\)", text)}
        assert sorted(logits) == [2, 4, 16], text
        assert logits[16] < 1e-5 < 1e-2 < logits[4] and logits[2] > 1e-2
        grads = re.findall(r"top_k 16: gradients equal SDPA's up to (\S+) \(relative", text)
        assert len(grads) == 1 and float(grads[0]) < 1e-5, text
    assert os.environ["MOBALAB_QUICK"] == "1"
