"""Ray on a real machine (issue 19): a second local Ray beside raypipe's must not make Ray's own
actors lose their way (Ray Train's placement-group cleaner does a bare ``ray.init()``-style
lookup of "the" local cluster), and nothing of a finished sweep may stay reserved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from raypipe.config import config_from_dict

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def second_ray():
    """Another local Ray on this machine (a notebook's, another sweep's), in a temp dir of its
    own, so that Ray's process scan finds two GCS servers. Stopped by its own driver (never
    `ray stop`, which would stop every Ray on the machine)."""
    tmp = Path(tempfile.mkdtemp(prefix="rp2-", dir="/tmp"))
    code = textwrap.dedent("""
        import signal, sys, time, ray
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit runs ray.shutdown (atexit)
        ctx = ray.init(address="local", num_cpus=1, include_dashboard=False)
        print("GCS", ctx.address_info["gcs_address"], flush=True)
        while True:
            time.sleep(1)
    """)
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("RAY_ADDRESS", None)
    for attempt in range(3):  # on a loaded machine Ray's own node start can time out; retry
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        line = ""
        deadline = time.monotonic() + 240
        while not line.startswith("GCS") and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        if line.startswith("GCS"):
            break
        _stop(proc)
    else:
        pytest.fail("the second Ray did not start (3 attempts)")
    try:
        yield line.split()[1]
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive(address: str) -> tuple[set[str], dict[str, str]]:
    """Placement groups not removed, and alive actors (id -> class), of the cluster at ``address``."""
    from ray.util.state import list_actors, list_placement_groups

    pgs = {p.placement_group_id for p in list_placement_groups(address=address, limit=10_000)
           if p.state != "REMOVED"}
    actors = {a.actor_id: a.class_name for a in list_actors(address=address, limit=10_000,
                                                            filters=[("state", "=", "ALIVE")])}
    return pgs, actors


# Cluster-wide singletons that Ray Data/Train keep for the cluster's lifetime (not per run).
SINGLETONS = {"_StatsActor", "TrainStateActor", "AutoscalingRequester", "_AutoscalingCoordinatorActor"}


def test_a_sweep_with_an_asha_stopped_trial_beside_a_second_ray_leaves_no_placement_group_or_actor(
    second_ray, ray_local, tiny_config
):
    import ray

    from raypipe.tuning import run

    gcs = ray.get_runtime_context().gcs_address
    assert gcs != second_ray
    pgs_before, actors_before = _alive(gcs)

    tree = tiny_config.model_dump(mode="json")
    tree["train"]["epochs"] = 2
    # One trial at a time, so ASHA's decision is deterministic: the first trial (lr 1e-7: the
    # untrained model, macro-F1 0.29 on the toy data) sets the first rung; the second (lr 1e-2:
    # too high for one epoch, it collapses to one class, macro-F1 0.17) is behind it and stopped.
    tree["tune"] = {
        "search_space": {"train.lr": {"grid": [1e-7, 1e-2]}},
        "search_alg": "grid",
        "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    }
    def users_handler(signum, frame):  # a notebook's or an app's own Ctrl-C handling
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, users_handler)
    try:
        result = run(config_from_dict(tree))
        assert signal.getsignal(signal.SIGINT) is users_handler  # not Tune's, after the sweep
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(t["status"] for t in result.trials) == ["completed", "early_stopped"], result.trials

    # Ray Train's cleaner frees a stopped trial's placement group a few seconds after its
    # controller died; give it (generously) time, then nothing of the sweep may be left.
    swept = time.monotonic()
    deadline = swept + 120
    while True:
        pgs, actors = _alive(gcs)
        left_pgs = pgs - pgs_before
        left_actors = {i: c for i, c in actors.items() if i not in actors_before and c not in SINGLETONS}
        if not left_pgs and not left_actors or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(f"\nRELIABILITY two_rays {{'cleared_after_s': {time.monotonic() - swept:.1f}, "
          f"'placement_groups_left': {len(left_pgs)}, 'actors_left': {len(left_actors)}}}")
    assert not left_pgs, f"placement groups of the sweep still reserved: {left_pgs}"
    assert not left_actors, f"actors of the sweep still alive: {left_actors}"


def test_after_training_ctrl_c_is_the_users_again_and_no_placement_group_is_left(ray_local, tiny_config):
    """Ray Train's fit() installs a SIGINT handler that aborts its run, and leaves it there."""
    from raypipe.training import run

    def users_handler(signum, frame):
        raise KeyboardInterrupt

    import ray

    tree = tiny_config.model_dump(mode="json")
    tree["train"]["epochs"] = 1
    gcs = ray.get_runtime_context().gcs_address
    pgs_before, _ = _alive(gcs)
    previous = signal.signal(signal.SIGINT, users_handler)
    try:
        run(config_from_dict(tree), track=False)
        assert signal.getsignal(signal.SIGINT) is users_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while (left := _alive(gcs)[0] - pgs_before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"placement groups of the training run still reserved: {left}"


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """Another model with other labels, so a swap shows in every answer."""
    from raypipe.config import RaypipeConfig
    from raypipe.model import build, save_checkpoint

    cfg = RaypipeConfig(model={"name": str(tiny_model_dir)})
    model, tokenizer = build(cfg.model, {"labels": ["neg", "pos"]})
    out = tmp_path_factory.mktemp("ckpt2") / "checkpoint"
    save_checkpoint(out, model, tokenizer, {"labels": ["neg", "pos"], "max_length": 32})
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_swap_on_a_cluster_with_no_headroom_reloads_in_place_or_fails_clearly_never_hangs(
    ray_local, tiny_checkpoint, second_checkpoint, tmp_path
):
    import threading

    import httpx
    import ray
    from ray import serve

    from raypipe.errors import RaypipeError
    from raypipe.serve import deploy

    tree = {"workdir": str(tmp_path / "work"), "serve": {"app_name": "noroom", "route_prefix": "/noroom"}}
    for attempt in range(3):  # a "free" port can be taken before Serve's proxy binds it
        tree["serve"]["port"] = _free_port()
        cfg = config_from_dict(tree)
        try:
            served = deploy(cfg, str(tiny_checkpoint), ready_timeout_s=180)
            break
        except Exception as exc:
            if "Failed to bind" not in repr(exc) or attempt == 2:
                raise
            serve.shutdown()

    @ray.remote
    class Blocker:  # another app's replica, a notebook's actor: whatever holds the rest
        def ping(self) -> bool:
            return True

    free = ray.available_resources().get("CPU", 0.0)
    blocker = Blocker.options(num_cpus=free).remote() if free > 0 else None
    try:
        if blocker is not None:
            ray.get(blocker.ping.remote(), timeout=120)
        assert ray.available_resources().get("CPU", 0.0) < 1  # no room for a second replica

        # Only the model changes: the running replica loads it in place, answering throughout.
        outcomes: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.post(f"{served.url}/predict", json={"texts": ["goal match"]})
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    outcomes.append(r.json()["predictions"][0]["label"])

        before = httpx.get(f"{served.url}/metadata", timeout=30).json()
        thread = threading.Thread(target=client)
        thread.start()
        messages: list[str] = []
        try:
            time.sleep(0.5)
            t0 = time.monotonic()
            again = deploy(cfg, str(second_checkpoint), ready_timeout_s=180, progress=messages.append)
            in_place_s = time.monotonic() - t0
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join(60)
        after = httpx.get(f"{again.url}/metadata", timeout=30).json()
        assert any("load the new model in place" in m for m in messages), messages
        assert after["labels"] == ["neg", "pos"] and before["labels"] != after["labels"]
        assert after["serving"]["replica"] == before["serving"]["replica"]  # reloaded, not replaced
        assert failures == [] and outcomes and outcomes[-1] in ("neg", "pos")

        # A swap that changes the replicas themselves needs room for a second one: a clear error
        # within serve.deploy_timeout_s, never a wait without end.
        tree["serve"].update(max_batch_size=8, deploy_timeout_s=20)
        t0 = time.monotonic()
        with pytest.raises(RaypipeError) as err:
            deploy(config_from_dict(tree), str(tiny_checkpoint), ready_timeout_s=180)
        msg = str(err.value)
        print(f"\nRELIABILITY no_headroom_swap {{'in_place_s': {in_place_s:.1f}, 'requests': {len(outcomes)}, "
              f"'failed': {len(failures)}, 'gave_up_after_s': {time.monotonic() - t0:.1f}}}\n{msg}")
        assert "did not finish in 20 s (serve.deploy_timeout_s)" in msg
        assert "the new replica needs 1 CPU; the cluster has 0" in msg and "held by" in msg
        assert "a swap needs room for the old and the new replica at once" in msg
        # and the old replica still answers
        assert httpx.post(f"{served.url}/predict", json={"texts": ["x"]}, timeout=60).status_code == 200
    finally:
        if blocker is not None:
            ray.kill(blocker)
        serve.delete("noroom")
        if not serve.status().applications:  # later modules start Serve on ports of their own
            serve.shutdown()
