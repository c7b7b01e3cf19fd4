"""The worker loop the fault-injection tests run: raypipe's own ``train_loop_per_worker``, with a
thin wrapper that (1) appends each worker's PID, node, rank, epoch and step to a JSONL file, and
(2) on the first attempt parks one rank mid-epoch so that the test can kill it (or its node) at a
known point - the parked worker has applied its steps, none of them checkpointed.

Epochs and steps are counted by wrapping ``raypipe.loop._batches`` (once per epoch) and
``raypipe.loop._to_device`` (once per batch), which the loop looks up on every call; renaming them
breaks these tests loudly, not silently. Used by ``test_worker_kill.py`` and
``multinode_driver.py`` (which imports it as a sibling module).
"""

from __future__ import annotations

import json
from pathlib import Path


def probe_loop(state_file: str, park_file: str, park_rank: int, park_at_step: int):
    """The loop for ``training.run(train_loop=...)``: parks ``park_rank`` before batch
    ``park_at_step + 1`` of epoch 2, once (not after a restart), until it is killed."""

    def loop(config):
        import json as _json
        import os as _os
        import time as _time

        import ray
        import ray.train

        import raypipe.loop as L

        rank = ray.train.get_context().get_world_rank()
        node = ray.get_runtime_context().get_node_id()
        resumed = ray.train.get_checkpoint() is not None
        where = {"epoch": 0, "step": 0}
        real_batches, real_to_device = L._batches, L._to_device

        def write(event: str) -> None:
            with open(state_file, "a") as f:
                f.write(_json.dumps({"t": _time.time(), "pid": _os.getpid(), "node": node, "rank": rank,
                                     "event": event, "resumed": resumed, **where}) + "\n")

        def batches(*a, **kw):
            where["epoch"] += 1
            where["step"] = 0
            return real_batches(*a, **kw)

        def to_device(*a, **kw):
            where["step"] += 1
            if (where["epoch"], where["step"], rank) == (2, park_at_step + 1, park_rank) and not resumed \
                    and not _os.path.exists(park_file):
                open(park_file, "w").close()
                write("parked")
                deadline = _time.monotonic() + 300
                while _time.monotonic() < deadline:  # the test kills this process (or its node) now
                    _time.sleep(0.05)
            return real_to_device(*a, **kw)

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                with open(_os.path.join(d, "raypipe.json")) as f:
                    where["epoch"] = _json.load(f)["epoch"]  # the last finished epoch
        write("start")  # "epoch" here: the last finished one (0 on a fresh start)
        L._batches, L._to_device = batches, to_device
        try:
            L.train_loop_per_worker(config)
        finally:
            L._batches, L._to_device = real_batches, real_to_device
        write("end")

    return loop


def events(state_file: Path) -> list[dict]:
    if not state_file.exists():
        return []
    return [json.loads(line) for line in state_file.read_text().splitlines() if line.strip()]
