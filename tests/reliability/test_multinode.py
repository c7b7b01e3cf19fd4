"""Multi-node, simulated on one machine: a real Ray cluster of four raylets (head + 3 worker
nodes, ``ray.cluster_utils.Cluster``) in a separate driver process (``multinode_driver.py``).

The head has no CPUs; each worker node has one, and each training worker needs one, so the run's
two workers are spread over two nodes, with one node spare. All nodes share one ``storage_path``.
The node holding rank 1 is removed mid-epoch 2, with every process on it (no drain): the run must
come back on the nodes that are left, from the epoch-1 checkpoint, and finish into one MLflow run
with exactly one value per epoch.
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


def _drive(tiny_config, tmp_path: Path) -> tuple[dict, dict, list[dict], object]:
    tree = tiny_config.model_dump(mode="json")
    tree["workdir"] = str(tmp_path / "work")
    tree["storage_path"] = str(tmp_path / "shared-storage")
    tree["ray"]["address"] = None  # the driver connects to its own cluster before raypipe looks
    tree["scaling"].update(num_workers=2, cpus_per_worker=1, max_failures=1)
    tree["train"].update(epochs=EPOCHS, batch_size=8, keep_checkpoints=1)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(tree))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(DRIVER), str(out), str(cfg_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    cluster = json.loads((out / "cluster.json").read_text())
    result = json.loads((out / "result.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line]
    from raypipe.config import config_from_dict

    return cluster, result, events, config_from_dict(tree)


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


def test_removing_a_worker_node_mid_run_resumes_on_the_nodes_left(tiny_config, tmp_path):
    cluster, result, events, cfg = _drive(tiny_config, tmp_path)

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
