"""The Colab notebook runs top to bottom (SMOKE mode: tiny model, 2 CPU steps) and exports an adapter.

The kernel is this interpreter (the venv's ipykernel) through a kernelspec written into a temporary
JUPYTER_PATH, which Jupyter searches before any user or system kernelspec; Jupyter's and IPython's
own folders are temporary too, so nothing outside tmp_path is read or written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # a notebook kernel, the whole notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "popo_lite_colab.ipynb"
KERNEL = "popo-lite-test"


def test_colab_notebook_runs_every_cell_in_smoke_mode_and_exports_the_adapter(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("POPO_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"  # the kernel's working directory: the notebook writes popo-colab/ here
    work.mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=KERNEL, timeout=240, resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")
    export = work / "popo-colab" / "export" / "popo-t4-step-000002-policy"
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert (export / "merged" / "config.json").is_file()
    assert list((export / "merged").glob("*.safetensors"))
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the live plot was drawn
