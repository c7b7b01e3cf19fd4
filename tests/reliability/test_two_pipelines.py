"""Issue 19, end to end: a sweep followed by a model swap completes while a second raypipe
pipeline (`raypipe run`, its own local Ray) runs on the same machine, and the sweep leaves no
placement group behind. Slow tier: two pipelines with sweeps (several minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(tiny_config, work: Path) -> dict:
    tree = tiny_config.model_dump(mode="json")
    tree["workdir"] = str(work)
    tree["train"]["epochs"] = 2
    # One trial at a time, the untrained-like lr first: ASHA then stops the collapsing lr 1e-2 trial.
    tree["tune"] = {"search_space": {"train.lr": {"grid": [1e-7, 1e-2, 3e-3]}}, "search_alg": "grid",
                    "max_concurrent_trials": 1,
                    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}}
    tree["ray"] = {"address": "local", "num_cpus": 2, "include_dashboard": True}
    tree["serve"] = {"port": _free_port()}
    return tree


def test_a_sweep_then_a_model_swap_complete_beside_a_second_raypipe_pipeline(tiny_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = _tree(tiny_config, tmp_path / "other")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    log = (tmp_path / "other.log").open("w")
    second = subprocess.Popen([sys.executable, "-m", "raypipe.cli", "run", str(tmp_path / "other.yaml")],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        time.sleep(20)  # the other pipeline's Ray is up (or coming up) when ours starts
        mine = _tree(tiny_config, tmp_path / "mine")
        script = textwrap.dedent(f"""
            import json, threading, time
            import httpx, ray
            from ray.util.state import list_placement_groups
            from raypipe.config import config_from_dict
            from raypipe.pipeline import run
            from raypipe.runtime import ensure_ray
            from raypipe.serve import deploy

            cfg = config_from_dict(json.loads({json.dumps(json.dumps(mine))}))
            ensure_ray(cfg)
            out = run(cfg, serve=False)
            gcs = ray.get_runtime_context().gcs_address
            served = deploy(cfg, out.champion_uri, ready_timeout_s=300)
            before = httpx.get(served.url + "/metadata", timeout=30).json()
            codes, stop = [], threading.Event()

            def loop():
                with httpx.Client(timeout=60) as c:
                    while not stop.is_set():
                        codes.append(c.post(served.url + "/predict", json={{"texts": ["goal"]}}).status_code)

            t = threading.Thread(target=loop)
            t.start()
            again = deploy(cfg, out.tune.best_checkpoint, ready_timeout_s=300)  # the swap
            time.sleep(1)
            stop.set()
            t.join()
            after = httpx.get(again.url + "/metadata", timeout=30).json()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pgs = [p.placement_group_id for p in list_placement_groups(address=gcs)
                       if p.state != "REMOVED"]
                if not pgs:
                    break
                time.sleep(2)
            print("RESULT", json.dumps({{"statuses": [t["status"] for t in out.tune.trials],
                                         "before": before["source"], "after": after["source"],
                                         "codes": sorted(set(codes)), "n": len(codes), "pgs": pgs}}))
            again.shutdown()
            ray.shutdown()
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                              timeout=1500, cwd=tmp_path)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
        result = json.loads(lines[-1].removeprefix("RESULT "))
        print("RELIABILITY two_pipelines", json.dumps(result))
        assert "early_stopped" in result["statuses"], result
        assert result["before"] != result["after"]  # the swap happened
        assert result["codes"] == [200] and result["n"] > 0  # with no failed request
        assert result["pgs"] == []  # nothing of the sweep still reserved
        assert second.wait(timeout=1500) == 0, (tmp_path / "other.log").read_text()[-4000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, 9)
            second.wait()
        log.close()
