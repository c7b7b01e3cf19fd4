"""Multi-node, simulated on one machine: a real Ray cluster of four raylets (head + 3 worker
nodes, ``ray.cluster_utils.Cluster``) in a separate driver process (``multinode_driver.py``),
run once for this module (the cluster start is most of its cost).

The head has no CPUs; each worker node has one, and each training worker needs one, so the run's
two workers are spread over two nodes, with one node spare. All nodes share one ``storage_path``.
The node holding rank 1 is removed mid-epoch 2, with every process on it (no drain): the run must
come back on the nodes that are left, from the epoch-1 checkpoint, and finish into one MLflow run
with exactly one value per epoch. The two nodes that are left then score a Parquet file with the
trained model through batch inference, one actor on each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

DRIVER = Path(__file__).with_name("multinode_driver.py")
EPOCHS = 4  # as in test_worker_kill.py: enough for the toy data to be learned (>= 0.9)


BATCH_ROWS = 4002


@pytest.fixture(scope="module")
def driven(tmp_path_factory, tiny_model_dir, toy_csv) -> tuple[dict, dict, list[dict], object, Path]:
    """The driver run, once: (cluster, result, events, config, out dir)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.config import config_from_dict

    tmp_path = tmp_path_factory.mktemp("multinode")
    tree = {
        "workdir": str(tmp_path / "work"),
        "storage_path": str(tmp_path / "shared-storage"),
        "data": {"path": str(toy_csv), "max_length": 32},
        "model": {"name": str(tiny_model_dir)},
        # the driver connects to its own cluster before raypipe looks
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1, "max_failures": 1},
        "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "keep_checkpoints": 1},
    }
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(tree))
    texts = [f"{w} number {i}" for i, w in enumerate(["goal match team", "chip robot software", "bread soup chef"]
                                                      * (BATCH_ROWS // 3))]
    pq.write_table(pa.table({"text": texts}), tmp_path / "to-score.parquet", row_group_size=500)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(DRIVER), str(out), str(cfg_path), str(tmp_path / "to-score.parquet")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    cluster = json.loads((out / "cluster.json").read_text())
    result = json.loads((out / "result.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line]
    return cluster, result, events, config_from_dict(tree), out


def _one_finished_run(cfg, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    return runs[0].data.tags


def test_removing_a_worker_node_mid_run_resumes_on_the_nodes_left(driven):
    cluster, result, events, cfg, _ = driven
    tmp_path = Path(cfg.workdir).parent

    first = [e for e in events if e["event"] == "start" and not e["resumed"]]
    assert sorted(e["rank"] for e in first) == [0, 1]
    nodes_first = {e["node"] for e in first}
    assert len(nodes_first) == 2 and cluster["head"] not in nodes_first  # spread over two worker nodes

    removed = cluster["removed"]
    assert removed and removed["event"] == "parked" and removed["epoch"] == 2, cluster
    assert removed["node"] not in cluster["alive_after"] and len(cluster["alive_after"]) == 3

    restarts = [e for e in events if e["event"] == "start" and e["t"] > removed["removed_at"]]
    assert sorted(e["rank"] for e in restarts) == [0, 1], events
    assert all(e["resumed"] and e["epoch"] == 1 for e in restarts)  # from the epoch-1 checkpoint
    nodes_after = {e["node"] for e in restarts}
    assert removed["node"] not in nodes_after and len(nodes_after) == 2  # the spare node took over
    ends = [e for e in events if e["event"] == "end"]
    assert sorted(e["rank"] for e in ends) == [0, 1] and all(e["node"] in nodes_after for e in ends)

    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
    tags = _one_finished_run(cfg, result["mlflow_run_id"])
    assert tags["raypipe.worker_failures"] == "1"
    assert Path(result["best_checkpoint"]).is_relative_to(tmp_path / "shared-storage")

    recovery_s = min(e["t"] for e in restarts) - removed["removed_at"]
    print("\nRELIABILITY multinode-remove", json.dumps({
        "cluster_startup_s": round(cluster["startup_s"], 1), "wall_s": round(result["wall_s"], 1),
        "removed_rank": removed["rank"], "removed_in_epoch": removed["epoch"],
        "recovery_s": round(recovery_s, 1), "val_accuracy": [h["val_accuracy"] for h in result["history"]],
        "last_worker_error": tags.get("raypipe.last_worker_error", "")[:160],
    }))
    assert result["history"][-1]["val_accuracy"] >= 0.9


def test_batch_inference_spreads_its_actors_over_two_nodes_and_keeps_every_row(driven):
    import pyarrow.parquet as pq

    from raypipe.predict import Predictor

    cluster, result, _, _, out = driven
    batch = json.loads((out / "batch.json").read_text())
    nodes = batch["rows_per_node"]
    assert len(nodes) == 2 and cluster["head"] not in nodes  # one actor on each node that is left
    assert set(nodes) <= set(cluster["alive_after"]) and all(n > 0 for n in nodes.values())
    assert sum(nodes.values()) == BATCH_ROWS == batch["rows_read"] == batch["rows_scored"]
    got = pq.read_table(out / "scored.parquet")
    texts = got.column("text").to_pylist()
    assert got.column("row_id").to_pylist() == list(range(BATCH_ROWS))
    assert texts[:2] == ["goal match team number 0", "chip robot software number 1"]  # input order
    expected = Predictor.from_dir(result["best_checkpoint"], device="cpu").predict(texts)
    assert got.column("pred_label").to_pylist() == [e["label"] for e in expected]
    print("\nRELIABILITY multinode-batch", json.dumps({k: batch[k] for k in ("rows_read", "rows_per_s", "actors",
                                                                            "rows_per_node")}))
