"""Security defaults of listening sockets, checked on real processes with psutil.

* ``raypipe ui --config <cfg> --port <p>`` (the installed console script, in a subprocess, in its
  own process group): once it answers, every LISTEN socket of its process tree (``mlflow ui``,
  uvicorn and its workers, the job consumers) is on 127.0.0.1, none on 0.0.0.0 or ``::``, and a
  connection to the port through any other address of this host is refused. The same command
  with ``--host 0.0.0.0``, run alongside, shows that the check sees a wildcard bind when there is
  one. Both are stopped by killing their process group; nothing of them may be left.
* The Ray dashboard that ``raypipe.runtime.ensure_ray`` starts from a default config
  (``ray.address: local``, ``ray.dashboard_host`` left at its default): a fresh Python process
  (the pytest process may hold a Ray of its own) starts Ray, finds the process that listens on the
  dashboard's port among its children and reports its LISTEN sockets, shuts Ray down, then does the
  same with ``ray.dashboard_host: 0.0.0.0``. The default must bind 127.0.0.1 only; the override
  must bind 0.0.0.0 (so the check can fail). The other Ray listeners (GCS, raylet, agents) are
  reported, not asserted: ``dashboard_host`` does not govern them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WILDCARDS = {"0.0.0.0", "::"}
SUMMARY: dict[str, object] = {}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(procs: list[psutil.Process]) -> list[dict]:
    """The LISTEN sockets (TCP, IPv4 and IPv6) of the given processes."""
    out = []
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append({"pid": p.pid, "name": name, "ip": c.laddr.ip, "port": c.laddr.port})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _other_host_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback (where a wildcard bind would be reachable)."""
    return sorted({
        a.address for addrs in psutil.net_if_addrs().values() for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    })


def _refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except OSError:
        return True


# ----------------------------------------------------------------------------- raypipe ui


def _start_ui(tmp: Path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    work = tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"workdir": str(work)}))
    port = _free_port("0.0.0.0")  # free on every interface, so either bind can take it
    script = Path(sys.executable).parent / "raypipe"
    assert script.is_file(), f"the raypipe console script is not installed next to {sys.executable}"
    log = tmp / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(script), "ui", "--config", str(cfg), "--port", str(port), *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp, env=_env(),
            start_new_session=True,  # its own process group: mlflow spawns uvicorn workers and job runners
        )
    return proc, port, log


def _wait_until_serving(proc: subprocess.Popen, port: int, log: Path, timeout: float = 150.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"raypipe ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if any(s["port"] == port for s in listening(_tree(psutil.Process(proc.pid)))):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
        time.sleep(0.5)
    pytest.fail(f"raypipe ui did not answer on port {port} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen) -> int:
    """SIGTERM the process group, SIGKILL what is left after 20 s; returns how many were left."""
    members = _tree(psutil.Process(proc.pid)) if proc.poll() is None else []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(members, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything that left the tree but not the group
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    return len(alive)


def test_raypipe_ui_binds_loopback_only_by_default(tmp_path):
    t0 = time.monotonic()
    default, port, log = _start_ui(tmp_path / "default")
    wildcard, wport, wlog = _start_ui(tmp_path / "wildcard", "--host", "0.0.0.0")
    try:
        startup_s = _wait_until_serving(default, port, log)
        _wait_until_serving(wildcard, wport, wlog)
        tree = _tree(psutil.Process(default.pid))
        socks = listening(tree)
        wsocks = listening(_tree(psutil.Process(wildcard.pid)))
        others = _other_host_addresses()
        reachable_elsewhere = [a for a in others if not _refused(a, port)]
        wildcard_reachable = [a for a in others if not _refused(a, wport)]
    finally:
        left = _stop_group(default) + _stop_group(wildcard)

    ips = sorted({s["ip"] for s in socks})
    SUMMARY["ui"] = {
        "processes": len(tree),
        "listen_sockets": len(socks),
        "listen_ips": ips,
        "listen_ports": sorted({s["port"] for s in socks}),
        "other_host_addresses_tried": others,
        "reachable_elsewhere": reachable_elsewhere,
        "startup_s": round(startup_s, 1),
        "with_host_0.0.0.0_listen_ips": sorted({s["ip"] for s in wsocks}),
        "with_host_0.0.0.0_reachable_at": wildcard_reachable,
        "left_after_stop": left,
        "seconds": round(time.monotonic() - t0, 1),
    }
    print("\nRELIABILITY bind_defaults.ui", json.dumps(SUMMARY["ui"]))
    assert any(s["port"] == port for s in socks), socks
    assert ips == ["127.0.0.1"], socks  # loopback only: no 0.0.0.0, no ::, no LAN address
    assert reachable_elsewhere == [], reachable_elsewhere
    # The negative: asked for it, the same check does see a wildcard bind.
    assert {s["ip"] for s in wsocks if s["port"] == wport} == {"0.0.0.0"}, wsocks
    assert wildcard_reachable == others, wildcard_reachable
    assert left == 0, "processes outlived SIGTERM to their process group"
    for proc in (default, wildcard):  # the whole group is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


# ----------------------------------------------------------------------------- Ray dashboard

# Runs in a fresh interpreter: ensure_ray() reuses an already initialised Ray, and pytest may have one.
RAY_PROBE = r'''
import contextlib, io, json, re, sys, time
import psutil, ray
from raypipe.config import config_from_dict
from raypipe.runtime import ensure_ray

def listening(procs):
    out = []
    for p in procs:
        try:
            name, cmd = p.name(), " ".join(p.cmdline())
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append({"pid": p.pid, "name": name, "cmd": cmd[:200], "ip": c.laddr.ip, "port": c.laddr.port})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out

results = []
for host in json.loads(sys.argv[1]):
    ray_cfg = {"address": "local", "num_cpus": 1}
    if host is not None:
        ray_cfg["dashboard_host"] = host
    printed = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(printed):
        owned = ensure_ray(config_from_dict({"ray": ray_cfg}))
    try:
        url = re.search(r"dashboard http://(\S+)", printed.getvalue())
        port = int(url.group(1).rsplit(":", 1)[1]) if url else None
        procs = psutil.Process().children(recursive=True)
        socks = listening(procs)
        results.append({
            "dashboard_host": host, "owned": owned, "url": url and url.group(1), "port": port,
            "dashboard": [s for s in socks if s["port"] == port],
            "others": [{k: s[k] for k in ("name", "ip", "port")} for s in socks if s["port"] != port],
            "pids": [p.pid for p in procs], "start_s": round(time.monotonic() - t0, 1),
        })
    finally:
        ray.shutdown()
print("PROBE " + json.dumps(results))
'''


@pytest.mark.ray
def test_ray_dashboard_binds_loopback_only_by_default():
    t0 = time.monotonic()
    # A short private temp dir: Ray's socket paths must stay short, and this run must not move the
    # /tmp/ray/session_latest link of any other Ray on this machine.
    ray_tmp = tempfile.mkdtemp(prefix="rp-bind-")
    try:
        out = subprocess.run(
            [sys.executable, "-c", RAY_PROBE, json.dumps([None, "0.0.0.0"])],
            check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env=_env(RAY_TMPDIR=ray_tmp),
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")]
        assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        default, wildcard = json.loads(lines[-1].removeprefix("PROBE "))
        # ray.shutdown() ended every process of both clusters (SIGKILL any straggler, all ours).
        procs = [psutil.Process(pid) for pid in default["pids"] + wildcard["pids"] if psutil.pid_exists(pid)]
        _, left = psutil.wait_procs(procs, timeout=20)
        for p in left:
            p.kill()
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)

    wide_open = sorted({f"{s['name']}@{s['ip']}" for s in default["others"] if s["ip"] in WILDCARDS})
    SUMMARY["ray"] = {
        "default_dashboard": [{k: s[k] for k in ("pid", "name", "ip", "port")} for s in default["dashboard"]],
        "default_dashboard_cmd": sorted({s["cmd"] for s in default["dashboard"]}),
        "dashboard_host_0.0.0.0": [{k: s[k] for k in ("name", "ip", "port")} for s in wildcard["dashboard"]],
        "start_s": [default["start_s"], wildcard["start_s"]],
        # not governed by ray.dashboard_host; reported for the record
        "other_ray_listeners_on_all_interfaces": wide_open,
        "left_after_shutdown": len(left),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print("\nRELIABILITY bind_defaults.ray", json.dumps(SUMMARY["ray"]))
    assert default["owned"] and default["port"], default
    assert default["dashboard"], f"nothing listens on the dashboard port {default['port']}: {default}"
    assert any("dashboard" in s["cmd"] for s in default["dashboard"]), default["dashboard"]
    assert {s["ip"] for s in default["dashboard"]} == {"127.0.0.1"}, default["dashboard"]
    # The negative: with the override the same probe sees the wildcard bind.
    assert {s["ip"] for s in wildcard["dashboard"]} == {"0.0.0.0"}, wildcard["dashboard"]


def test_bind_defaults_summary():
    """Runs after the two tests above: one line with both results."""
    print("\nRELIABILITY bind_defaults", json.dumps(SUMMARY))
    assert "ui" in SUMMARY, sorted(SUMMARY)  # (the Ray half is skipped under -m "not ray")
