"""Driver for ``test_multinode.py``: a real multi-node Ray cluster on one machine.

Run as its own process (the pytest process already has a Ray of its own)::

    python multinode_driver.py <out_dir> <config.json>

``ray.cluster_utils.Cluster`` starts a head node with **no CPUs** (it holds the driver, the Train
controller and the MLflow callback) and three worker nodes with one CPU each, each a separate
raylet with its own object store. A training worker needs one CPU, so the two workers of the run
land on two different nodes and the third node is spare. Every node writes to the same
``storage_path`` (a local directory standing in for NFS or S3).

Rank 1 parks after a few steps of epoch 2 (it has applied them, none are in a checkpoint); once
the Train controller has registered the epoch-1 checkpoint, the node that holds rank 1 is removed
from the cluster (its raylet and every process on it are killed, ``allow_graceful=False``: no
drain, no notice). ``FailureConfig`` must bring a new worker group up on the nodes that are left
and resume from the epoch-1 checkpoint.

Writes ``events.jsonl`` (one line per worker event, with node id and pid), ``cluster.json`` (the
nodes, and the one removed) and ``result.json`` (the run's history, MLflow run id, timings).

With a third argument (a Parquet file), the cluster that is left (two one-CPU worker nodes) then
scores that file with the trained checkpoint through ``raypipe.batch.run`` — two actors, one
per node — into ``scored.parquet``, and writes ``batch.json`` (the job's ``BatchResult``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from fault_probe import (  # a sibling module: this script's directory is on sys.path
    events,
    probe_loop,
)

PARK_RANK = 1
PARK_AT_STEP = 4


def main() -> int:
    out, cfg_path = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    import ray
    from ray.cluster_utils import Cluster

    from raypipe.config import config_from_dict
    from raypipe.training import run

    t0 = time.time()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            # Notice a dead node within a few seconds (the default allows ~30 s of silence).
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5},
        },
    )
    workers = {}
    for _ in range(3):
        node = cluster.add_node(num_cpus=1)
        workers[node.node_id] = node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    started_s = time.time() - t0
    print(f"[driver] cluster up in {started_s:.1f} s: head + {len(workers)} worker nodes", flush=True)

    tree = json.loads(cfg_path.read_text())
    cfg = config_from_dict(tree)
    state_file, park_file = out / "events.jsonl", out / "parked"
    snapshot = Path(cfg.resolved_storage_path) / "mn-run" / "checkpoint_manager_snapshot.json"
    removed: dict = {}

    def controller_has_epoch_1() -> bool:
        try:
            doc = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            return False
        return any(r["metrics"].get("epoch") == 1 for r in doc.get("checkpoint_results", []))

    def remover() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            parked = [e for e in events(state_file) if e["event"] == "parked"]
            if parked and controller_has_epoch_1():
                e = parked[0]
                removed.update(e)
                removed["alive_nodes_before"] = sum(n["Alive"] for n in ray.nodes())
                cluster.remove_node(workers[e["node"]], allow_graceful=False)
                removed["removed_at"] = time.time()
                print(f"[driver] removed node {e['node'][:12]} (rank {e['rank']}, pid {e['pid']})", flush=True)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=remover, daemon=True)
    thread.start()
    t1 = time.time()
    result = run(cfg, run_name="mn-run", train_loop=probe_loop(str(state_file), str(park_file),
                                                                 PARK_RANK, PARK_AT_STEP))
    wall = time.time() - t1
    thread.join(5)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(sys.argv) > 3:
        from raypipe.batch import run as batch_run

        scored = batch_run(str(result.best_checkpoint), sys.argv[3], str(out / "scored.parquet"), cfg,
                           log_run=False)
        (out / "batch.json").write_text(json.dumps(scored.to_dict(), default=str))
    (out / "cluster.json").write_text(json.dumps({
        "head": cluster.head_node.node_id, "workers": sorted(workers), "removed": removed,
        "alive_after": alive, "startup_s": started_s,
    }))
    (out / "result.json").write_text(json.dumps({
        "history": result.history, "mlflow_run_id": result.mlflow_run_id, "wall_s": wall,
        "best_checkpoint": str(result.best_checkpoint) if getattr(result, "best_checkpoint", None) else None,
    }, default=str))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
