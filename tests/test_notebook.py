"""The quickstart notebook, executed top to bottom with nbclient on the tiny model and toy data.

Only the cell tagged "parameters" is replaced (config path, serve port); every other cell runs as
a user would run it. The notebook is stored without outputs, so a diff shows code, not results.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
NOTEBOOK_MAX_LINES = 90  # the summaries the cells print, the data report, stage and epoch lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"stored with outputs: {cell.source[:60]!r}"
    names = {line.split("=")[0].split(":")[0].strip() for line in _parameters_cell(nb).source.splitlines() if "=" in line}
    assert {"CONFIG", "OVERRIDES", "TUNE_OVERRIDES", "SERVE_PORT"} <= names


@pytest.mark.ray
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, tiny_model_dir, toy_csv):
    from mlflow.tracking import MlflowClient
    from nbclient import NotebookClient

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "work"),
        "name": "nb",
        # A Ray of its own (never another test's cluster); no dashboard: FIFO needs no State API.
        # Local-mode training (num_workers 0) keeps the run to ~2 min; tests/test_job_submit.py
        # covers a real worker group.
        "ray": {"address": "local", "num_cpus": 2, "include_dashboard": False},
        "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "use_gpu": False},
        "tune": {"search_space": {"train.lr": {"choice": [3e-3, 6e-3]}}, "scheduler": {"type": "fifo"}},
        "registry": {"model_name": "nb-tiny"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"},
    }))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _parameters_cell(nb).source = "\n".join([
        f"CONFIG = {str(config)!r}",
        "OVERRIDES = []",
        "TUNE_OVERRIDES = ['tune.num_samples=1', 'scaling.num_workers=1']",  # one trial on a real worker
        f"SERVE_PORT = {_free_port()}",
    ])
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # learning curves, confusion matrix, sweep
    tables = [o for o in outputs if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]]
    assert len(tables) >= 4  # data, runs, history, trials, predictions
    text = "".join(o.get("text", "") for o in outputs)
    assert "served by" in text and text.rstrip().endswith(f"raypipe ui --config {config}")
    # As quiet as `raypipe run`: raypipe's lines only; Ray's and the workers' output is in the log file.
    noise = re.compile(r"\(\w+ pid=\d+|\(raylet\)|Trial status|View detailed results|TensorBoard|run snapshot|"
                       r"INFO |it/s\]|DeprecationWarning|Started a local Ray")
    assert not noise.search(text), f"{noise.search(text).group(0)!r} in\n{text}"
    assert len(text.splitlines()) <= NOTEBOOK_MAX_LINES, text
    assert list((tmp_path / "work" / "logs").glob("*.log"))

    # What the notebook did is in the MLflow store: train, evaluate, sweep runs and a champion.
    store = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    # registry_uri too: without it MlflowClient uses this process's global registry URI, which an
    # earlier test may have pointed at its own store.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("raypipe").experiment_id])
    stages = {r.data.tags.get("raypipe.stage") for r in runs}
    assert {"train", "evaluate", "trial"} <= stages
    trials = [r for r in runs if r.data.tags.get("raypipe.stage") == "trial"]
    assert len(trials) == 1 and "val_macro_f1" in trials[0].data.metrics  # the sweep really ran
    champion = client.get_model_version_by_alias("nb-tiny", "champion")
    assert int(champion.version) >= 1
