"""Which Ray raypipe joins: never a cluster that is gone (issue: a SIGKILLed head left its address
in Ray's current-cluster file, and the next session retried its dead GCS for ever)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest


def _dead_port() -> int:
    with socket.socket() as s:  # bound and closed: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_answers_tells_a_listening_port_from_a_dead_one():
    from raypipe.runtime import _answers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert _answers(f"127.0.0.1:{s.getsockname()[1]}")
    assert not _answers(f"127.0.0.1:{_dead_port()}", timeout_s=1)
    assert _answers("ray://head:10001")  # not host:port of a GCS: left to Ray


@pytest.mark.ray
def test_a_dead_cluster_in_rays_current_cluster_file_starts_a_new_local_ray_and_a_dead_address_is_an_error():
    # A short TMPDIR of its own (Ray's socket paths must stay short): Ray reads its
    # current-cluster file there, so the machine's real /tmp/ray is not touched.
    tmp = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    (tmp / "ray").mkdir()
    dead = f"127.0.0.1:{_dead_port()}"
    (tmp / "ray" / "ray_current_cluster").write_text(dead)
    code = textwrap.dedent(f"""
        import ray
        from raypipe.config import config_from_dict
        from raypipe.errors import ConfigError
        from raypipe.runtime import ensure_ray
        assert ensure_ray(config_from_dict({{"ray": {{"num_cpus": 1, "include_dashboard": False}}}}))
        print("CPUS", ray.cluster_resources()["CPU"])
        ray.shutdown()
        try:
            ensure_ray(config_from_dict({{"ray": {{"address": "{dead}"}}}}))
        except ConfigError as exc:
            print("ERROR", exc)
    """)
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the Ray cluster last started on this machine ({dead}) no longer answers" in proc.stdout
    assert "CPUS 1.0" in proc.stdout
    assert f"- ray.address is {dead}, but no Ray cluster answers there" in proc.stdout


def test_worker_placement_wait_is_bounded_by_scaling_start_timeout_s(monkeypatch):
    """Ray Train retries a worker group it cannot place for ever (controller_failure_limit -1);
    raypipe bounds the retries by scaling.start_timeout_s, unless wait_for_resources."""
    from raypipe.config import config_from_dict
    from raypipe.runtime import start_retries

    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert start_retries(config_from_dict({})) == 4  # 300 s = 5 tries of Ray's 60 s
    assert start_retries(config_from_dict({"scaling": {"start_timeout_s": 30}})) == 0
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    assert start_retries(config_from_dict({"scaling": {"start_timeout_s": 30}})) == 2
    assert start_retries(config_from_dict({"scaling": {"wait_for_resources": True}})) == -1
