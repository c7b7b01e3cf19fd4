"""Issue 19, part 3 for real: a `ray start` head killed with SIGKILL (as the OOM killer does) leaves
its address in Ray's current-cluster file; the next `raypipe` command must start a new local
Ray with a one-line message instead of retrying the dead GCS for ever. (The default tier covers
the same path with a written-down dead address: tests/test_runtime.py.) Slow tier: a real
`ray start` plus a real `raypipe train` (about a minute on 2 cores)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this test's own Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


def _kill_all(marker: str) -> None:
    for pid in _pids_under(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while _pids_under(marker) and time.monotonic() < deadline:
        time.sleep(0.5)


def test_after_a_sigkilled_head_raypipe_starts_a_new_local_ray_with_a_message(tiny_config, tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="rpk-", dir="/tmp"))  # short: Ray's socket paths
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TMPDIR": str(tmp)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    try:
        for attempt in range(3):  # on a loaded machine Ray's own node start can time out
            started = subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1",
                                      "--include-dashboard=false"], env=env, capture_output=True, text=True,
                                     timeout=300)
            if started.returncode == 0:
                break
            _kill_all(str(tmp))
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        current = (tmp / "ray" / "ray_current_cluster").read_text().strip()
        assert current.endswith(f":{port}")
    finally:
        _kill_all(str(tmp))  # the head dies as the OOM killer kills it: SIGKILL, no cleanup

    tree = tiny_config.model_dump(mode="json")
    tree["train"]["epochs"] = 1
    tree["scaling"] = {"num_workers": 0}
    tree["ray"] = {"num_cpus": 1, "include_dashboard": False}  # address: null, as in the notebook
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raypipe.cli", "train", str(tmp_path / "cfg.yaml")],
                          env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    _kill_all(str(tmp))  # anything of this test's Rays that outlived the command
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"the Ray cluster last started on this machine ({current}) no longer answers" in proc.stdout
    print(f"RELIABILITY killed_head {{'train_s': {took:.1f}}}")
