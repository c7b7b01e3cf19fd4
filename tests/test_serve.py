"""Ray Serve: the real deployment on 127.0.0.1 with the tiny checkpoint.

Serve tests share one Ray instance and one deployment for the whole module (a cold start costs
~10-25 s on 2 cores); the `serve run` test runs its own, isolated Ray in a subprocess. The tests
at the top need no Ray: the swap logic and the builder are plain Python.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from raypipe.config import config_from_dict
from raypipe.errors import ConfigError
from raypipe.predict import Predictor

TEXTS = [
    "the striker scored a late goal and the team won the cup",
    "chip",
    "a startup ships new software for every phone and computer",
    "the chef made soup with cheese and fresh bread for dinner",
    "coach",
    "robot code internet",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """Another model: different labels (so a swap is visible in every answer)."""
    from raypipe.config import RaypipeConfig
    from raypipe.model import build, save_checkpoint

    cfg = RaypipeConfig(model={"name": str(tiny_model_dir)})
    model, tokenizer = build(cfg.model, {"labels": ["neg", "pos"]})
    out = tmp_path_factory.mktemp("ckpt2") / "checkpoint"
    save_checkpoint(out, model, tokenizer, {"labels": ["neg", "pos"], "max_length": 32})
    return out


# --------------------------------------------------------------------- no Ray needed


def test_reconfigure_loads_the_new_model_while_the_old_one_keeps_answering(tiny_checkpoint, second_checkpoint):
    from raypipe.serve import ModelService

    svc = ModelService({"max_batch_size": 8})

    async def scenario() -> tuple[list[str], int, list[BaseException]]:
        await svc.reconfigure({"model_uri": str(tiny_checkpoint)})
        first = svc.slot()
        await svc.reconfigure({"model_uri": str(tiny_checkpoint)})  # same spec: no reload
        assert svc.slot() is first
        seen: list[str] = []
        errors: list[BaseException] = []
        swapping, done = asyncio.Event(), asyncio.Event()
        during_swap = 0

        async def client() -> None:
            nonlocal during_swap
            while not done.is_set():
                try:
                    [(preds, used)] = await svc._run([(["goal match", "chip code"], None)])
                    assert len(preds) == 2 and set(preds[0]["probabilities"]) == set(used.labels)
                    seen.append(used.meta["path"])
                    during_swap += swapping.is_set()
                except Exception as exc:  # every failure counts
                    errors.append(exc)
                await asyncio.sleep(0)

        async def answers(n: int) -> None:  # wait for n more answers (not a fixed time: CI is slow)
            target = len(seen) + n
            while len(seen) < target and not errors:
                await asyncio.sleep(0.005)

        task = asyncio.create_task(client())
        await asyncio.wait_for(answers(3), 60)
        swapping.set()
        await svc.reconfigure({"model_uri": str(second_checkpoint)})
        swapping.clear()
        await asyncio.wait_for(answers(3), 60)
        done.set()
        await task
        return seen, during_swap, errors

    seen, during_swap, errors = asyncio.run(scenario())
    assert errors == []
    old, new = str(tiny_checkpoint.resolve()), str(second_checkpoint.resolve())
    assert seen[0] == old and seen[-1] == new
    assert seen == sorted(seen, key=lambda p: p == new)  # old ... old new ... new: no flapping
    assert during_swap > 0  # requests were answered while the new model loaded
    assert svc.slot().labels == ["neg", "pos"] and svc.spec.model_uri == str(second_checkpoint)


def test_a_revision_bump_reloads_the_same_uri(tiny_checkpoint):
    from raypipe.serve import ModelService

    svc = ModelService({})
    asyncio.run(svc.reconfigure({"model_uri": str(tiny_checkpoint), "revision": "1"}))
    before = svc.slot()
    asyncio.run(svc.reconfigure({"model_uri": str(tiny_checkpoint), "revision": "2"}))
    assert svc.slot() is not before and svc.spec.revision == "2"


def test_replicas_get_the_deployers_mlflow_credentials_as_an_init_argument_not_in_the_deployment_options(
    tmp_path, monkeypatch
):
    """A replica is a Ray worker that never saw the deployer's environment: the MLflow credentials
    a models:/ URI needs reach it as an init argument, never through ray_actor_options (which
    ``serve status`` and the dashboard print)."""
    import json as _json

    from raypipe.config import config_from_dict
    from raypipe.serve import ModelService, build_app

    cfg = config_from_dict({"workdir": str(tmp_path), "name": "creds"})
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "deployer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-9f1c")
    node = build_app(cfg, "models:/some-model@champion", tracking_uri="http://127.0.0.1:5000")._bound_deployment
    assert node.init_kwargs["credentials"] == {"MLFLOW_TRACKING_USERNAME": "deployer",
                                               "MLFLOW_TRACKING_PASSWORD": "pw-9f1c"}
    options = _json.dumps([node.user_config, node.ray_actor_options, node.init_args], default=str)
    assert "pw-9f1c" not in options
    # A plain checkpoint dir needs no tracking server: nothing is handed over.
    assert build_app(cfg, str(tmp_path))._bound_deployment.init_kwargs["credentials"] == {}

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    ModelService({}, credentials={"MLFLOW_TRACKING_PASSWORD": "pw-9f1c", "PATH": "/nowhere"})
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw-9f1c"  # the replica process has it now
    assert os.environ["PATH"] != "/nowhere"  # only MLflow's credential variables are taken
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")


def test_check_health_runs_the_model_and_catches_a_broken_one(tiny_checkpoint):
    import torch

    from raypipe.serve import ModelService

    svc = ModelService({})
    with pytest.raises(RuntimeError, match="no model"):
        asyncio.run(svc.check_health())
    asyncio.run(svc.reconfigure({"model_uri": str(tiny_checkpoint)}))
    asyncio.run(svc.check_health())  # a real prediction, fine

    broken = svc.slot()
    with torch.no_grad():  # a model whose weights went bad: every answer is NaN
        broken.model.classifier.bias.fill_(float("nan"))
    svc._last_ok = 0.0  # nothing succeeded recently, so the probe must run
    with pytest.raises(RuntimeError, match="NaN or inf"):
        asyncio.run(svc.check_health())


def test_app_builder_turns_serve_run_arguments_into_the_deployment(tiny_checkpoint, tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from raypipe.serve import app

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"serve": {"max_batch_size": 4, "num_replicas": 3,
                                                  "max_queued_requests": 7}}))
    # Exactly what `serve run raypipe.serve:app key=value ...` does with its arguments.
    built = call_user_app_builder_with_args_if_necessary(app, {
        "model_uri": str(tiny_checkpoint), "config": str(cfg_file),
        "max_batch_size": "16", "serve.max_ongoing_requests": "48",
    })
    d = built._bound_deployment  # Serve has no public accessor for a bound app's deployment
    assert d.user_config == {"model_uri": str(tiny_checkpoint.resolve()), "tracking_uri": None, "revision": None}
    assert d.num_replicas == 3 and d.max_queued_requests == 7 and d.max_ongoing_requests == 48
    assert d.init_args[0]["max_batch_size"] == 16  # key=value beats the config file
    assert d.ray_actor_options["num_gpus"] == 0

    with pytest.raises(ConfigError, match="serve.max_batchsize"):
        app({"model_uri": str(tiny_checkpoint), "max_batchsize": "16"})
    with pytest.raises(ConfigError, match="no model to serve"):
        app({})


def test_emit_config_writes_a_valid_serve_deploy_file(tiny_checkpoint, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from raypipe.cli import main as cli
    from raypipe.serve import DEPLOYMENT_NAME, app

    out = tmp_path / "serve.yaml"
    assert cli(["serve", str(tiny_checkpoint), "--port", "8123", "--replicas", "2",
                "--emit-config", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)  # what `serve deploy` checks first
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8123}
    [application] = doc["applications"]
    assert application["import_path"] == "raypipe.serve:app"
    assert application["args"]["model_uri"] == str(tiny_checkpoint.resolve())
    assert application["deployments"][0]["name"] == DEPLOYMENT_NAME
    assert application["deployments"][0]["user_config"]["revision"] == "1"
    assert app(application["args"])._bound_deployment.num_replicas == 2  # the builder takes its args


# --------------------------------------------------------------------- real Serve


def test_serve_run_import_path_serves_predict(tiny_checkpoint, tmp_path):
    """`serve run raypipe.serve:app model_uri=... key=value` in a subprocess.

    The subprocess runs Serve's own `serve run` command, after pinning it to a fresh local Ray
    and a free port: a bare `serve run` would join any Ray started with `ray start` on this
    machine (and shut down *its* Serve on exit), and `serve run IMPORT_PATH` always takes port
    8000. Interrupting the subprocess shuts down its Serve and its own Ray only.
    """
    port = _free_port()
    script = textwrap.dedent(f"""
        import sys
        import ray
        from ray import serve
        from ray.serve.scripts import cli
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve")
        serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
        cli(["run", "raypipe.serve:app", "model_uri={tiny_checkpoint}", "max_batch_size=8"])
    """)
    log = (tmp_path / "serve-run.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if ready:
                break
            time.sleep(1)
        log.seek(0)
        assert ready, f"serve run did not come up; its output:\n{log.read()[-4000:]}"
        r = httpx.post(f"{url}/predict", json={"texts": TEXTS[:2]}, timeout=30)
        assert r.status_code == 200, r.text
        offline = Predictor.from_dir(tiny_checkpoint, device="cpu").predict(TEXTS[:2])
        assert [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in offline]
        assert httpx.get(f"{url}/metadata").json()["serving"]["max_batch_size"] == 8
    finally:
        proc.send_signal(signal.SIGINT)  # serve run: shut down Serve, then exit (and its Ray)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


CHAMPION = "models:/serve-tiny@champion"


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """One Serve deployment for the module, on a free port, of the registry's champion: the
    tiny checkpoint registered as version 1 in a real sqlite MLflow store."""
    import ray
    from ray import serve

    from raypipe.registration import register_checkpoint
    from raypipe.serve import deploy

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = config_from_dict({
        "workdir": str(tmp_path_factory.mktemp("serve-work")),
        "serve": {
            "port": port, "max_batch_size": 16, "batch_wait_timeout_s": 0.02,
            # Small enough that the overload test can fill them. The proxy counts a request as
            # queued while it picks a replica, so the queue must hold the batching test's 4
            # simultaneous clients.
            "max_ongoing_requests": 4, "max_queued_requests": 8,
            "max_texts": 8, "max_chars": 200,
        },
    })
    v1 = register_checkpoint(tiny_checkpoint, cfg, name="serve-tiny", metrics={"test_macro_f1": 0.5})
    assert v1.version == "1" and v1.decision.promoted
    start = time.perf_counter()
    handle = deploy(cfg, CHAMPION, ready_timeout_s=180)
    print(f"\ndeploy (Serve already started) took {time.perf_counter() - start:.1f} s")
    yield SimpleNamespace(url=handle.url, cfg=cfg)
    serve.shutdown()
    if started:
        ray.shutdown()


def served_run_id(served) -> str:
    from mlflow.tracking import MlflowClient

    uri = served.cfg.resolved_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("serve-tiny", "1").run_id


def _post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, timeout=60, **kw)


def test_served_predictions_equal_the_offline_predictor(served, tiny_checkpoint):
    offline = Predictor.from_dir(tiny_checkpoint, device="cpu")
    r = _post(served.url, {"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    want = offline.predict(TEXTS)
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in want]
    for got, ref in zip(body["predictions"], want):
        assert got["score"] == pytest.approx(ref["score"], abs=1e-5)
        for label, prob in ref["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(prob, abs=1e-5)
    assert body["model"] == {"name": "serve-tiny", "version": "1", "run_id": served_run_id(served)}
    top = _post(served.url, {"text": TEXTS[0], "top_k": 1}).json()["predictions"][0]
    assert top["probabilities"] == {want[0]["label"]: pytest.approx(want[0]["score"], abs=1e-5)}


def test_concurrent_requests_are_batched_and_still_match(served, tiny_checkpoint):
    offline = {t: p for t, p in zip(TEXTS, Predictor.from_dir(tiny_checkpoint, device="cpu").predict(TEXTS))}
    before = httpx.get(f"{served.url}/stats").json()
    texts = TEXTS * 8

    def one(text: str) -> dict:
        r = _post(served.url, {"text": text})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    # 4 clients: within the queue limit, so every request is admitted, and they overlap.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, texts))
    for text, got in zip(texts, results):  # batched with strangers, padded differently: same answer
        assert got["label"] == offline[text]["label"]
        assert got["score"] == pytest.approx(offline[text]["score"], abs=1e-5)
    after = httpx.get(f"{served.url}/stats").json()
    batches = after["batches"] - before["batches"]
    requests = after["requests"] - before["requests"]
    assert requests == len(texts)
    assert batches < requests, after  # several requests shared a model call
    assert after["max_batch_size_seen"] > 1
    assert after["arrivals_waited"] > before["arrivals_waited"]  # overlapping requests waited for company


def test_a_lone_client_does_not_make_its_requests_wait_for_company(served):
    """serve.batch_wait_timeout_s is spent only while requests overlap on the replica: one
    request at a time (after at most a few, if a burst came just before) opens its batch at once."""
    for _ in range(12):
        assert _post(served.url, {"text": "goal"}).status_code == 200
    before = httpx.get(f"{served.url}/stats").json()
    for _ in range(8):
        assert _post(served.url, {"text": "goal"}).status_code == 200
    after = httpx.get(f"{served.url}/stats").json()
    assert after["arrivals_alone"] - before["arrivals_alone"] == 8, (before, after)
    assert after["arrivals_waited"] == before["arrivals_waited"]
    assert after["batch_wait_s"] == served.cfg.serve.batch_wait_timeout_s


@pytest.mark.parametrize("content, content_type, status", [
    (b'{"texts": ["a"', "application/json", 400),
    (b'{"texts": ["a"]}', "text/plain", 415),
    (b'{"texts": []}', "application/json", 422),
    (b'{"texts": ["ok", "  "]}', "application/json", 422),
    (b'{"texts": [1, 2]}', "application/json", 422),
    (json.dumps({"texts": ["a"] * 9}).encode(), "application/json", 422),
    (json.dumps({"text": "x" * 201}).encode(), "application/json", 422),
    (b'{"texts": ["a"], "extra": true}', "application/json", 422),
    (b"[" * 50_000, "application/json", 413),
])
def test_bad_input_is_rejected_and_the_replica_keeps_answering(served, content, content_type, status):
    r = httpx.post(f"{served.url}/predict", content=content, headers={"content-type": content_type}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert _post(served.url, {"text": "still here"}).status_code == 200


def test_overload_is_answered_with_503_and_retry_after(served):
    barrier = threading.Barrier(64)

    def one(_: int) -> httpx.Response:
        barrier.wait(30)
        return _post(served.url, {"texts": TEXTS + TEXTS[:2]})

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(one, range(64)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "4 ongoing + 8 queued cannot hold 64 simultaneous requests"
    assert all(r.headers.get("retry-after") == "1" for r in rejected)
    assert _post(served.url, {"text": "after the storm"}).status_code == 200


def test_cli_predict_over_http_and_offline_print_the_same_labels(served, tiny_checkpoint, capsys, monkeypatch):
    from raypipe.cli import main as cli

    monkeypatch.delenv("RAYPIPE_TOKEN", raising=False)
    assert cli(["predict", "--url", served.url, "--json", *TEXTS]) == 0
    over_http = json.loads(capsys.readouterr().out)
    assert cli(["predict", "--model", str(tiny_checkpoint), "--json", *TEXTS]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in over_http] == [p["label"] for p in offline]
    assert [p["score"] for p in over_http] == pytest.approx([p["score"] for p in offline], abs=1e-5)


def test_alias_move_and_redeploy_swap_the_model_with_no_failed_request(served, second_checkpoint):
    """Last in the module: it replaces the model the other tests rely on."""
    from raypipe.registration import register_checkpoint
    from raypipe.serve import deploy

    outcomes: list[tuple[int, str | None]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{served.url}/predict", json={"texts": ["goal match", "chip"]})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                outcomes.append((r.status_code, r.json()["model"]["version"]))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.5)
        v2 = register_checkpoint(second_checkpoint, served.cfg, name="serve-tiny",
                                 metrics={"test_macro_f1": 0.9})
        assert v2.version == "2" and v2.decision.promoted  # @champion moved to v2
        start = time.perf_counter()
        again = deploy(served.cfg, CHAMPION, ready_timeout_s=180)  # the same URI, redeployed
        swap_s = time.perf_counter() - start
        deadline = time.monotonic() + 30  # until the old replica has drained and stopped
        while time.monotonic() < deadline and (not outcomes or outcomes[-1][1] != "2"):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(60)
    print(f"\nredeploy took {swap_s:.1f} s; {len(outcomes)} requests during the swap")
    assert failures == []
    versions = [v for _, v in outcomes]
    assert versions[0] == "1" and versions[-1] == "2"
    meta = httpx.get(f"{again.url}/metadata").json()
    assert meta["model"] == {"name": "serve-tiny", "version": "2", "run_id": v2.run_id}
    assert meta["labels"] == ["neg", "pos"] and meta["source"] == CHAMPION


@pytest.mark.slow
def test_serve_deploy_of_the_emitted_config_swaps_in_place_on_a_user_config_change(
        tiny_checkpoint, second_checkpoint, tmp_path):
    """`serve deploy` semantics: bumping user_config reloads the model in the live replica.

    Needs the dashboard (Serve's REST API), so it runs in its own Ray in a subprocess; about
    30 s, hence `slow`.
    """
    script = textwrap.dedent(f"""
        import json, socket, threading, time
        import httpx, ray
        from ray import serve
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
        from raypipe.config import config_from_dict
        from raypipe.serve import serve_config_doc

        def free():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        dash, port = free(), free()
        ray.init(address="local", num_cpus=2, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=dash)
        doc = serve_config_doc(config_from_dict({{"serve": {{"port": port}}}}), "{tiny_checkpoint}")
        client = ServeSubmissionClient(f"http://127.0.0.1:{{dash}}")
        url = f"http://127.0.0.1:{{port}}"
        try:
            client.deploy_applications(doc)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            before = httpx.get(url + "/metadata").json()
            user_config = doc["applications"][0]["deployments"][0]["user_config"]
            user_config.update(model_uri="{second_checkpoint}", revision="2")
            codes, stop = [], threading.Event()

            def loop():
                with httpx.Client(timeout=60) as c:
                    while not stop.is_set():
                        codes.append(c.post(url + "/predict", json={{"text": "x"}}).status_code)

            t = threading.Thread(target=loop)
            t.start()
            client.deploy_applications(doc)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                after = httpx.get(url + "/metadata").json()
                if after["labels"] != before["labels"]:
                    break
                time.sleep(0.25)
            time.sleep(0.5)
            stop.set()
            t.join()
            print("RESULT", json.dumps({{"before": before, "after": after, "codes": codes}}))
        finally:
            serve.shutdown()
            ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=400, start_new_session=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    before, after = result["before"], result["after"]
    assert after["labels"] == ["neg", "pos"] and after["path"] == str(second_checkpoint.resolve())
    assert after["serving"]["replica"] == before["serving"]["replica"]  # no restart
    assert after["serving"]["revision"] == "2"
    assert result["codes"] and set(result["codes"]) == {200}


def test_access_log_off_leaves_no_request_lines_in_the_replica_log(served, tiny_checkpoint):
    """serve.access_log: false is handed to Serve: that replica logs no line per request, while
    the default app beside it does."""
    import ray
    from ray import serve

    from raypipe.serve import deploy

    tree = served.cfg.model_dump(mode="json")
    tree["serve"].update(app_name="quiet", route_prefix="/quiet", access_log=False)
    quiet = deploy(config_from_dict(tree), str(tiny_checkpoint), ready_timeout_s=180)
    try:
        for url in (quiet.url, served.url):  # quiet first: its lines, if any, are flushed first
            for _ in range(3):
                assert _post(url, {"text": "goal match"}).status_code == 200
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"

        def request_lines(app: str, path: str) -> int:  # waits for the first line to appear
            deadline = time.time() + 20  # replica logs are flushed asynchronously
            while True:
                n = sum(f.read_text(errors="replace").count(f"POST {path} 200")
                        for f in logs.glob(f"replica_{app}_*.log"))
                if n or time.time() > deadline:
                    return n
                time.sleep(0.5)

        assert request_lines(served.cfg.serve.app_name, "/predict") >= 3  # logs were flushed by now
        assert list(logs.glob("replica_quiet_*.log"))  # the quiet replica does log, just not requests
        assert sum(f.read_text(errors="replace").count("POST /quiet/predict")
                   for f in logs.glob("replica_quiet_*.log")) == 0
    finally:
        serve.delete("quiet")
