"""Serve a raypipe model with Ray Serve, behind the FastAPI app of :mod:`raypipe.api`.

Three entry points, one ``serve:`` config section:

    raypipe serve models:/name@champion [--port --replicas --gpu]     -> :func:`main`
    serve run raypipe.serve:app model_uri=models:/name@champion         -> :func:`app` (builder)
    raypipe serve MODEL --emit-config serve.yaml && serve deploy serve.yaml

and, from Python (the pipeline), ``served = deploy(cfg, uri)`` ... ``served.shutdown()``.

How a replica works
    * The model comes from ``user_config`` (``{"model_uri", "tracking_uri", "revision"}``).
      Serve calls :meth:`ModelService.reconfigure` with it at start and whenever it changes:
      the new model is loaded and warmed up in a worker thread while the old one keeps
      answering, then one reference assignment swaps them (no failed request in between).
    * ``POST /predict`` goes through ``@serve.batch``: one batch item is one request's list of
      inputs (texts or pairs), sized by their number, so ``serve.max_batch_size`` counts inputs. A request
      is never split across batches, so it is answered by exactly one model, even mid-swap.
    * Inference runs on one dedicated thread (one batch at a time per replica, which is what
      the device can do anyway); the event loop stays free for /health, /ready and queuing.
    * Batch sizes go to the ``raypipe_batch_size`` histogram (Ray metrics / Prometheus) and to
      the replica's ``GET /stats``.
    * ``check_health`` runs a real (tiny) prediction unless a batch succeeded moments ago.

Model swaps
    * ``serve deploy`` with a changed ``user_config`` (the emitted YAML has a ``revision`` to
      bump after the alias moved): Serve calls ``reconfigure`` on the live replicas; nothing
      restarts.
    * ``deploy()`` again (or ``raypipe serve`` again): Serve's imperative API replaces the
      replicas; ``max_surge_percent=100`` keeps the old ones serving until the new ones are
      ready, at the price of room for one extra set of replicas during the swap.
"""

# No `from __future__ import annotations` here: Serve inspects the builder's parameter
# annotation at run time to turn `serve run ... key=value` arguments into `AppArgs`.

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import RayServeException

from raypipe.api import (
    RETRY_AFTER_S,
    ApiError,
    BatchStats,
    ModelSlot,
    create_app,
    probe,
    resolve_token,
    warm_up,
)
from raypipe.batching import BatchWait
from raypipe.config import (
    RaypipeConfig,
    ServeConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from raypipe.errors import ConfigError, RaypipeError
from raypipe.generation import GenerationEngine

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "RaypipeModel"
IMPORT_PATH = "raypipe.serve:app"
# check_health skips the probe when a batch succeeded this recently: under load the model is
# demonstrably working, and a probe queued behind real batches could time out spuriously.
HEALTH_FRESH_S = 10.0
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class ModelSpec(BaseModel):
    """The deployment's ``user_config``: which model to serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str = Field(min_length=1, description="models:/name@alias, models:/name/3 or a dir.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ URIs.")
    revision: str | None = Field(
        None, description="Change it to reload the same URI (e.g. after the alias moved)."
    )


def _count_texts(requests: list[Any]) -> int:
    return sum(len(item[0]) for item in requests)


def adapter_id(uri: str) -> str:
    """The name a request uses for a served model: ``models:/bbc/2`` -> ``bbc/2``, a dir -> its name."""
    if uri.startswith("models:/"):
        return uri.removeprefix("models:/")
    return Path(uri).name


class ModelService:
    """The replica: model slot, batched prediction, health, swaps. Wrapped by Serve below.

    A plain class, so the swap logic can be tested without Ray; only ``_predict_batch`` (the
    ``@serve.batch`` path) needs a running replica.
    """

    def __init__(self, serve_settings: dict[str, Any], model_uri: str | None = None,
                 tracking_uri: str | None = None, credentials: dict[str, str] | None = None):
        # The deployer's MLflow credentials, for models:/ URIs on a server with auth: replicas run
        # in Ray's worker processes, which never saw the deployer's environment. An init argument
        # (not runtime_env env_vars, which `serve status` and the dashboard print).
        for key, value in (credentials or {}).items():
            if key in CREDENTIAL_ENV:
                os.environ[key] = value
        self.cfg = ServeConfig.model_validate(serve_settings)
        self.slot = ModelSlot()
        self.spec: ModelSpec | None = None
        self.stats = BatchStats()
        # Batches wait serve.batch_wait_timeout_s for company only while requests overlap here.
        self.batch_wait = BatchWait(self.cfg.batch_wait_timeout_s)
        self._infer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypipe-infer")
        self._swap_lock = asyncio.Lock()
        self._last_ok = 0.0
        self._metrics = _replica_metrics()
        # Multiplexed LoRA adapters on the served model's base (serve.adapters).
        self._adapter_uris = {adapter_id(u): u for u in self.cfg.adapters}
        self._model_lock = threading.Lock()  # one forward pass (and adapter switch) at a time
        self._adapter_seq = 0
        # Adapters Serve's LRU evicted are deleted from the model only once no request that
        # already holds one is still waiting for its forward pass (refcounts under _refs_lock:
        # Serve calls the eviction hook on a worker thread).
        self._refs_lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        self._evicted: dict[str, Any] = {}
        self._multiplexed: Any = None
        # Language models (task: sft): the OpenAI routes' batcher, on the same inference thread.
        self.generation = GenerationEngine(self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s,
                                           executor=self._infer, on_batch=self._generated)
        # The decorator's numbers are placeholders; the config decides.
        self._predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        if model_uri is not None:  # bound without user_config: load now
            spec = ModelSpec(model_uri=model_uri, tracking_uri=tracking_uri)
            self.slot.install(self._load(spec), source=spec.model_uri, warm=False)
            self.spec = spec

    # --- Serve hooks -------------------------------------------------------------------

    def __serve_build_asgi_app__(self) -> Any:
        # Built per replica after __init__, so the routes close over this replica's slot and
        # batcher instead of a module-level app shared by every deployment in the process.
        return create_app(self.slot, self.cfg, predict_fn=self.predict, stats=self._stats,
                          serving_info=self.serving_info,
                          adapter_fn=self.adapter if self._adapter_uris else None,
                          generation=self.generation, served_ids=self._served_ids,
                          hold=self._hold, release=self._release)

    def _stats(self) -> dict[str, Any]:
        return {**self.stats.snapshot(), **self.batch_wait.snapshot()}

    def _generated(self, requests: int, seconds: float) -> None:
        """A generation batch finished (on the inference thread): stats, metrics, health."""
        self._last_ok = time.monotonic()
        self.stats.record(requests, requests, seconds)
        if self._metrics is not None:
            self._metrics[0].observe(requests)
            self._metrics[1].observe(seconds)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the model ``user_config`` names (if it changed) and swap it in when warm."""
        spec = ModelSpec.model_validate(user_config)
        async with self._swap_lock:
            if spec == self.spec:
                return
            previous = self.spec.model_uri if self.spec else None
            start = time.perf_counter()
            # A worker thread: the replica keeps answering with the old model while loading.
            predictor = await asyncio.to_thread(self._load, spec)
            self.slot.install(predictor, source=spec.model_uri, warm=False)
            self.spec = spec
            self._multiplexed = None  # adapters loaded onto the old base reload onto the new one
            logger.info("raypipe: serving %s (was %s), loaded and warmed up in %.1f s",
                        spec.model_uri, previous, time.perf_counter() - start)

    async def check_health(self) -> None:
        predictor = self.slot()
        if predictor is None:
            raise RuntimeError("no model loaded")
        if time.monotonic() - self._last_ok < HEALTH_FRESH_S:
            return
        # Not on the inference thread: a long queue of batches must not make the probe late.
        await asyncio.to_thread(probe, predictor)
        self._last_ok = time.monotonic()

    # --- prediction --------------------------------------------------------------------

    async def predict(self, texts: list[Any], adapter: Any = None) -> tuple[list[dict[str, Any]], Any]:
        """The app's predict_fn: through the batcher, unless the request is a batch by itself.
        ``adapter``: the Predictor of a multiplexed adapter the request chose."""
        held = self._hold(adapter)  # before the first await: eviction can't slip in between
        wait = self.batch_wait.arrive()
        try:
            if len(texts) > self.cfg.max_batch_size:
                # serve.batch rejects an item larger than a whole batch; such a request already
                # fills one, so it runs alone (still on the single inference thread).
                return (await self._run([(texts, adapter)]))[0]
            # Read by the batcher when this request opens a batch (a lone client's runs at once).
            self._predict_batch.set_batch_wait_timeout_s(wait)
            return await self._predict_batch((texts, adapter))
        finally:
            self.batch_wait.leave()
            self._release(held)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_count_texts)
    async def _predict_batch(self, requests: list[tuple[list[Any], Any]]) -> list[tuple[list[dict[str, Any]], Any]]:
        return await self._run(requests)

    async def _run(self, requests: list[tuple[list[Any], Any]]) -> list[tuple[list[dict[str, Any]], Any]]:
        default = self.slot()  # one model for the whole batch, even if a swap lands meanwhile
        if default is None and any(adapter is None for _, adapter in requests):
            raise ApiError(503, "the model is not loaded yet; retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        # One forward pass per adapter: requests for different adapters in one batch window
        # (Serve splits by header; a body's `model` field can mix them) are grouped here.
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, (_, adapter) in enumerate(requests):
            predictor = adapter or default
            groups.setdefault(id(predictor), (predictor, []))[1].append(i)
        out: list[Any] = [None] * len(requests)
        loop = asyncio.get_running_loop()
        for predictor, members in groups.values():
            flat = [t for i in members for t in requests[i][0]]
            start = time.perf_counter()
            preds = await loop.run_in_executor(self._infer, predictor.predict, flat)
            elapsed = time.perf_counter() - start
            self._last_ok = time.monotonic()
            self.stats.record(len(flat), len(members), elapsed)
            if self._metrics is not None:
                self._metrics[0].observe(len(flat))
                self._metrics[1].observe(elapsed)
            k = 0
            for i in members:
                n = len(requests[i][0])
                out[i] = (preds[k : k + n], predictor)
                k += n
        return out

    # --- multiplexed adapters ------------------------------------------------------------

    def _served_ids(self) -> list[str]:
        predictor = self.slot()
        own = [adapter_id(self.spec.model_uri)] if self.spec else []
        if predictor is not None and predictor.meta.get("model_name") and predictor.meta.get("model_version"):
            own = [f"{predictor.meta['model_name']}/{predictor.meta['model_version']}", *own]
        return list(dict.fromkeys([*own, *self._adapter_uris]))

    async def adapter(self, model_id: str) -> Any:
        """The Predictor for ``model_id`` (a served adapter, or the deployment's own model)."""
        name = model_id.removeprefix("models:/")
        default = self.slot()
        if default is None:
            raise ApiError(503, "the model is not loaded yet; retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        own = [i for i in self._served_ids() if i not in self._adapter_uris]
        if name in own:
            return default
        if name not in self._adapter_uris:
            raise ApiError(404, f"model '{model_id}' is not served here",
                           [f"served: {', '.join(self._served_ids())}"])
        if self._multiplexed is None:
            # Created on first use and again after a swap (adapters sit on the old base then):
            # Serve's LRU of `max_adapters_per_replica`, and the model ids it reports for routing.
            async def load(key: str) -> Any:
                return await asyncio.get_running_loop().run_in_executor(self._infer, self._attach, key, default)

            self._multiplexed = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(load)
        while True:
            loaded = await self._multiplexed(name)
            if not loaded.evicted:  # (evicted while this request waited for the LRU: reload)
                return loaded.predictor

    def _hold(self, predictor: Any) -> str | None:
        name = getattr(predictor, "adapter", None)
        if predictor is None or name in (None, "default"):
            return None
        with self._refs_lock:
            self._in_use[name] = self._in_use.get(name, 0) + 1
        return name

    def _release(self, name: str | None) -> None:
        if name is None:
            return
        with self._refs_lock:
            self._in_use[name] -= 1
            if self._in_use[name]:
                return
            del self._in_use[name]
            predictor = self._evicted.pop(name, None)
        if predictor is not None:
            self._infer.submit(self._delete_adapter, predictor)

    def _evict(self, predictor: Any) -> None:
        """Serve's LRU dropped this adapter: delete it now, or when its last request is done."""
        with self._refs_lock:
            if self._in_use.get(predictor.adapter):
                self._evicted[predictor.adapter] = predictor
                return
        # On the inference thread: after every forward pass already queued there.
        self._infer.submit(self._delete_adapter, predictor)

    def _delete_adapter(self, predictor: Any) -> None:
        try:
            with self._model_lock:
                if predictor.adapter in getattr(predictor.model, "peft_config", {}):
                    predictor.model.delete_adapter(predictor.adapter)
        except Exception:  # noqa: BLE001 - a failed cleanup must not take the replica down
            logger.warning("raypipe: removing adapter %s failed", predictor.adapter, exc_info=True)

    def _attach(self, name: str, base: Any) -> Any:
        """Load adapter ``name`` onto the served model (on the inference thread)."""
        from transformers import AutoTokenizer

        from raypipe import adapters
        from raypipe.model import read_meta
        from raypipe.predict import Predictor
        from raypipe.registry import resolve

        if not base.meta.get("peft"):
            raise ApiError(409, "serve.adapters needs the served model to be a LoRA adapter too "
                           f"(it is a fully fine-tuned {base.task.name} model)")
        tracking = self.spec.tracking_uri if self.spec else None
        try:
            resolved = resolve(self._adapter_uris[name], tracking_uri=tracking)
            meta = read_meta(resolved.path)
            self._adapter_seq += 1
            internal = f"raypipe_{self._adapter_seq}"
            with self._model_lock:
                if base.adapter is None:  # from now on the base switches adapters per forward pass
                    base.adapter, base.lock = "default", self._model_lock
                adapters.attach(base.model, resolved.path, meta, internal, like=base.meta)
                base.model.set_adapter(base.adapter)
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        except RaypipeError as exc:
            raise ApiError(409, f"adapter '{name}' cannot be served with this model: {exc}") from None
        meta = {**meta, "path": resolved.path, **resolved.as_meta()}
        predictor = Predictor(base.model, tokenizer, meta, device=base.device, adapter=internal, lock=self._model_lock)
        logger.info("raypipe: adapter %s loaded onto %s", name, self.spec.model_uri if self.spec else "?")
        return _LoadedAdapter(predictor, self._evict)

    def serving_info(self) -> dict[str, Any]:
        predictor = self.slot()
        return {
            "replica": _replica_id(),
            "device": getattr(predictor, "device", None),
            "model_uri": self.spec.model_uri if self.spec else None,
            "revision": self.spec.revision if self.spec else None,
            "adapters": list(self._adapter_uris),
            "max_batch_size": self.cfg.max_batch_size,
            "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
        }

    @staticmethod
    def _load(spec: ModelSpec) -> Any:
        from raypipe.registry import load_predictor

        predictor = load_predictor(spec.model_uri, tracking_uri=spec.tracking_uri)
        warm_up(predictor)
        return predictor


class _LoadedAdapter:
    """What Serve's multiplexing LRU holds. Serve calls ``__del__`` when the LRU evicts it (on a
    worker thread), and Python may call it again later: only the first call counts."""

    def __init__(self, predictor: Any, on_evict: Callable[[Any], None]):
        self.predictor = predictor
        self.evicted = False
        self._on_evict = on_evict

    def __del__(self) -> None:
        if getattr(self, "evicted", True):
            return
        self.evicted = True
        try:
            self._on_evict(self.predictor)
        except Exception:  # noqa: BLE001 - never raise from a finaliser (e.g. replica shutting down)
            logger.debug("raypipe: removing adapter %s failed", self.predictor.adapter, exc_info=True)


def _replica_metrics() -> tuple[Any, Any] | None:
    """Ray metrics exist only inside a replica (None elsewhere, e.g. in unit tests)."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return None
    from ray.serve.metrics import Histogram

    return (
        Histogram("raypipe_batch_size", description="Texts per model call (dynamic batching).",
                  boundaries=BATCH_SIZE_BUCKETS),
        Histogram("raypipe_batch_latency_s", description="Seconds per batched model call.",
                  boundaries=LATENCY_BUCKETS_S),
    )


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


# The deployment. `serve.ingress()` without an app: the app comes from
# `__serve_build_asgi_app__` on each replica. Options here are defaults; `build_app` sets the
# configured ones.
RaypipeModel = serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=64,  # Serve's default of 5 would cap every batch at 5 requests
    health_check_period_s=10,
    health_check_timeout_s=30,
    max_constructor_retry_count=3,  # a model that fails to load fails again; don't retry 20x
)(serve.ingress()(ModelService))


# --------------------------------------------------------------------------- building


def _normalise_uri(uri: str) -> str:
    """models:/ URIs pass through; a dir becomes absolute (replicas have another cwd)."""
    if uri.startswith("models:/") or "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _check_source(uri: str) -> None:
    """Fail in the caller, in a second, for a dir that is not a checkpoint (not after 25 s)."""
    if uri.startswith("models:/") or "://" in uri:
        return
    from raypipe.model import read_meta

    read_meta(uri)


def _cluster_gpus() -> float | None:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else None


def _gpus_per_replica(use_gpu: Any) -> int:
    if use_gpu is False:
        return 0
    have = _cluster_gpus()
    if use_gpu is True:
        if have == 0:
            raise RaypipeError(
                "serve.use_gpu is true but the Ray cluster has no GPU (replicas would wait "
                "forever); set serve.use_gpu: false or auto"
            )
        return 1
    if have is None:  # `serve run` calls the builder before it starts Ray: look locally
        import torch

        return 1 if torch.cuda.is_available() else 0
    return 1 if have > 0 else 0


def deployment_options(s: ServeConfig, spec: ModelSpec) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "user_config": spec.model_dump(mode="json"),
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        # Overload answers 503 + Retry-After instead of piling requests up at the proxy.
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "ray_actor_options": {"num_cpus": 1, "num_gpus": _gpus_per_replica(s.use_gpu)},
        # Redeploys keep the old replicas until the new ones pass their health check.
        "max_surge_percent": 100,
        "logging_config": {"enable_access_log": s.access_log},
    }
    if s.autoscaling is not None:
        opts["autoscaling_config"] = {
            "min_replicas": s.autoscaling.min_replicas,
            "max_replicas": s.autoscaling.max_replicas,
            "target_ongoing_requests": s.autoscaling.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _credentials(tracking_uri: str | None) -> dict[str, str]:
    """The deployer's MLflow credentials that the replicas need to resolve models:/ URIs."""
    if tracking_uri is None:
        return {}
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}


def _replica_settings(cfg: RaypipeConfig, uri: str, tracking_uri: str | None) -> tuple[dict[str, Any], str | None]:
    """``cfg.serve`` as the replicas get it (adapter dirs absolute: a replica's cwd differs) and
    the tracking URI, resolved here whenever the model or one of its adapters is a models:/ URI."""
    settings = cfg.serve.model_dump(mode="json")
    settings["adapters"] = [_normalise_uri(a) for a in cfg.serve.adapters]
    if tracking_uri is None and any(u.startswith("models:/") for u in [uri, *settings["adapters"]]):
        tracking_uri = cfg.resolved_tracking_uri
    return settings, tracking_uri


def build_app(cfg: RaypipeConfig, model_uri: str, *, tracking_uri: str | None = None,
              revision: str | None = None, version: str | None = None) -> Any:
    """The Serve application (``RaypipeModel.bind(...)``) for ``model_uri`` under ``cfg.serve``.
    ``version``: the deployment's code version (see :func:`_shape`); Serve reloads replicas of
    an unchanged version in place (``reconfigure``) and replaces those of a new one."""
    uri = _normalise_uri(model_uri)
    settings, tracking_uri = _replica_settings(cfg, uri, tracking_uri)
    spec = ModelSpec(model_uri=uri, tracking_uri=tracking_uri, revision=revision)
    opts = deployment_options(cfg.serve, spec)
    creds = _credentials(tracking_uri)
    if version is None:
        return RaypipeModel.options(**opts).bind(settings, credentials=creds)
    return RaypipeModel.options(**opts, _internal=True, version=version).bind(settings, credentials=creds)


def _shape(cfg: RaypipeConfig, model_uri: str) -> str:
    """A digest of everything of a deployment but its model: replicas of the same shape can load
    another model in place (the version's prefix; a random suffix makes each deploy new)."""
    import hashlib

    settings, _ = _replica_settings(cfg, _normalise_uri(model_uri), None)
    opts = deployment_options(cfg.serve, ModelSpec(model_uri="-"))
    opts.pop("user_config")
    blob = json.dumps([settings, opts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _running_version(app_name: str) -> str | None:
    """The code version of the app's running deployment, None when there is none."""
    try:
        from ray.serve.context import _get_global_client  # private: no public accessor

        status = serve.status().applications.get(app_name)
        if status is None or status.status.value != "RUNNING":
            return None
        return _get_global_client().get_deployment_info(DEPLOYMENT_NAME, app_name)[0].version
    except Exception:  # noqa: BLE001
        return None


class AppArgs(BaseModel):
    """Arguments of ``serve run raypipe.serve:app key=value ...`` (or a config's ``args:``).

    Keys other than these are config overrides: ``max_batch_size=16`` means
    ``serve.max_batch_size=16``, and dotted keys (``tracking.experiment=x``) are used as is.
    """

    model_config = ConfigDict(extra="allow")

    model_uri: str | None = Field(None, description="Default: serve.model_uri from the config.")
    config: str | None = Field(None, description="raypipe YAML config whose serve: section applies.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ URIs.")
    revision: str | None = Field(None, description="Change it to force a reload of the same URI.")
    serve: dict[str, Any] | None = Field(None, description="A whole serve: section (overrides config).")


def _override(key: str, value: Any) -> str:
    path = key if "." in key else f"serve.{key}"
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{path}={text}"


def app(args: AppArgs) -> Any:
    """Typed Serve application builder: ``serve run raypipe.serve:app model_uri=...``."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    tree = load_config(args.config).model_dump(mode="json")
    if args.serve:
        tree["serve"] = {**tree["serve"], **args.serve}
    tree = apply_overrides(tree, [_override(k, v) for k, v in (args.model_extra or {}).items()])
    cfg = config_from_dict(tree, source=args.config)
    model_uri = args.model_uri or cfg.serve.model_uri
    if not model_uri:
        raise ConfigError("no model to serve: pass model_uri=models:/name@alias (or a checkpoint "
                          "dir), or set serve.model_uri in the config")
    return build_app(cfg, model_uri, tracking_uri=args.tracking_uri, revision=args.revision)


app_builder = app


# --------------------------------------------------------------------------- running


@dataclass
class Served:
    """A running application: where it answers, and how to stop it."""

    url: str
    app_name: str
    model_uri: str
    handle: Any = field(repr=False, default=None)
    started_ray: bool = False
    startup_s: float = 0.0
    # Each replica's own URL (serve.direct_ingress): no proxy hop, but one replica each, and a
    # replica replaced by a swap of serve settings or a restart may answer on another port.
    direct_urls: list[str] = field(default_factory=list)

    def shutdown(self) -> None:
        shutdown(self)


# Serve's direct ingress (ray/serve/_private/constants.py): each replica serves HTTP on a port of
# its own (30000-30999, on http_options.host) beside the proxy. Serve reads these in its
# controller, which hands its environment to the replicas; set when raypipe starts Serve. No
# drain wait before a replica stops (the 30 s default is for external load balancers) and a freed
# port is reused at once (a restarted replica gets its port back).
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    "RAY_SERVE_PORT_QUARANTINE_S": "0",
}


def _serve_running() -> bool:
    """Whether a Serve controller runs in this cluster already (its settings then stay)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=False) is not None
    except Exception:  # noqa: BLE001 - a private accessor: when in doubt, not started here
        return True


def _direct_urls(s: ServeConfig, proxy_url: str, token: str | None, say: Callable[[str], None],
                 timeout_s: float = 2.0) -> list[str]:
    """The app's replicas' own URLs (direct ingress) that answer ``/ready``; [] (and a note) when
    the running Serve was started without direct ingress."""
    from urllib.parse import urlsplit

    import httpx
    from ray.serve.context import _get_global_client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    proxy_port = urlsplit(proxy_url).port  # where the proxy really listens (Serve may predate cfg)
    deadline = time.monotonic() + timeout_s
    while True:
        try:  # private accessor (the same data as the dashboard's /api/serve/applications/)
            groups = _get_global_client().get_serve_details().get("target_groups") or []
        except Exception:  # noqa: BLE001 - an older or different Serve: no direct URLs
            groups = []
        targets = sorted({(t["ip"], t["port"]) for g in groups if g.get("app_name") == s.app_name
                          and "HTTP" in str(g.get("protocol", "")).upper()
                          for t in g.get("targets", []) if t["port"] != proxy_port})
        if targets or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if not targets:
        say("  note: no direct replica URL — this Serve was started without direct ingress "
            "(`serve shutdown` and deploy again, or set RAY_SERVE_ENABLE_DIRECT_INGRESS=1 on the cluster)")
        return []
    prefix = s.route_prefix.rstrip("/")
    if s.host in ("0.0.0.0", "::", ""):  # replicas listen on every interface of their node
        urls = [f"http://{'[' + ip + ']' if ':' in ip else ip}:{port}{prefix}" for ip, port in targets]
    else:  # on serve.host of their node: reachable as such only on this node
        import ray

        here = ray.util.get_node_ip_address()
        base = proxy_url.rsplit(":", 1)[0]  # http://host of the proxy's URL
        urls = [f"{base}:{port}{prefix}" for ip, port in targets if ip == here]
    answering = []
    for u in urls:
        try:
            httpx.get(f"{u}/ready", headers=headers, timeout=5).raise_for_status()
            answering.append(u)
        except httpx.HTTPError as exc:  # the proxy's URL works; say why this one is left out
            say(f"  note: the replica URL {u} does not answer /ready ({exc}); use the proxy's")
    return answering


def client_url(s: ServeConfig) -> str:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def _running_http(s: ServeConfig, say: Callable[[str], None]) -> ServeConfig:
    """Where Serve really listens: it keeps the HTTP options it was first started with."""
    try:  # private accessor, hence the fallback to the config
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, int(http.port)
    except Exception:
        return s
    if (host, port) != (s.host, s.port):
        say(f"note: Serve was already running on {host}:{port}; serve.host/port "
            f"({s.host}:{s.port}) apply only when Serve starts")
        return s.model_copy(update={"host": host, "port": port})
    return s


def _watch_status(app_name: str, progress: Callable[[str], None], stop: threading.Event) -> None:
    """Print the app's deployment status whenever it changes, until ``stop`` is set."""
    last = None
    while not stop.wait(2.0):
        try:
            status = serve.status().applications.get(app_name)
        except Exception:  # the controller may still be starting
            continue
        if status is None:
            continue
        parts = [f"app {status.status.value}"]
        for name, dep in status.deployments.items():
            states = ", ".join(f"{n} {s}" for s, n in sorted(dep.replica_states.items()))
            parts.append(f"{name} {dep.status.value}" + (f" ({states})" if states else ""))
        line = "; ".join(parts)
        if line != last:
            progress(f"  {line}")
            last = line


def _wait_running(s: ServeConfig, model_uri: str, *, swap: bool, room: str | None) -> None:
    """Wait (at most ``serve.deploy_timeout_s``) for the app to run; on giving up, say what the
    cluster lacks instead of waiting for ever for replicas it cannot place."""
    deadline = time.monotonic() + s.deploy_timeout_s
    while True:
        status = serve.status().applications.get(s.app_name)
        state = status.status.value if status else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED":  # (as Serve's own wait: UNHEALTHY may still recover)
            raise RuntimeError(status.message or state)
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    from raypipe.runtime import room_for

    replicas = s.num_replicas if s.autoscaling is None else s.autoscaling.min_replicas
    fits, now = room_for({"CPU": 1.0, "GPU": float(_gpus_per_replica(s.use_gpu))}, replicas)
    detail = "" if fits else f": {room or now}"
    hint = ("; a swap needs room for the old and the new replica at once — free a CPU, lower "
            "serve.num_replicas, or change only the model (same serve settings) so the running "
            "replicas reload it in place" if swap else
            "; free a CPU (stop another app or run), lower serve.num_replicas, or add a node")
    raise RaypipeError(
        f"deploying {model_uri} as '{s.app_name}' did not finish in {s.deploy_timeout_s:g} s "
        f"(serve.deploy_timeout_s), app {state}{detail}" + (hint if not fits else
        f"; Serve says: {_status_words(status)}")
    )


def _status_words(status: Any) -> str:
    if status is None:
        return "the app does not exist"
    parts = [status.message] if status.message else []
    for name, dep in status.deployments.items():
        states = ", ".join(f"{n} {s}" for s, n in sorted(dep.replica_states.items()))
        parts.append(f"{name} {dep.status.value}" + (f" ({states})" if states else "")
                     + (f": {dep.message}" if dep.message else ""))
    return "; ".join(parts) or "no message"


def _wait_ready(url: str, token: str | None, timeout_s: float) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/ready", headers=headers, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)  # the proxy learns new routes a moment after the app is RUNNING
    raise RaypipeError(f"the model server at {url} did not become ready in {timeout_s:.0f} s ({last})")


def deploy(cfg: RaypipeConfig, model_uri: str | None = None, blocking: bool = False, *,
           revision: str | None = None, ready_timeout_s: float = 600.0,
           progress: Callable[[str], None] | None = None) -> Served:
    """Serve ``model_uri`` (default ``cfg.serve.model_uri``) and return once it answers /ready.

    Starts Ray (local, dashboard on 127.0.0.1; or ``$RAY_ADDRESS``) and Serve (HTTP on
    ``serve.host:serve.port``) when they are not running. Deploying again under the same
    ``serve.app_name`` swaps the model without failed requests. With ``blocking=True`` it
    serves until Ctrl-C and then shuts down. The bearer token (``serve.auth_token_env``) is
    read from the environment of the replicas, which a Ray started here inherits.
    """
    say = progress or (lambda _msg: None)
    s = cfg.serve
    model_uri = model_uri or s.model_uri
    if not model_uri:
        raise ConfigError("no model to serve: pass a models:/ URI or checkpoint dir, or set serve.model_uri")
    for source in [model_uri, *s.adapters]:
        _check_source(_normalise_uri(source))
    token = resolve_token(s)  # fail here, not in every replica, when the variable is unset
    start = time.perf_counter()
    from raypipe.runtime import ensure_ray, room_for

    started_ray = ensure_ray(cfg)
    fresh_serve = not _serve_running()
    serve.start(http_options={"host": s.host, "port": s.port},
                controller_options={"runtime_env": {"env_vars": dict(DIRECT_INGRESS_ENV)}} if s.direct_ingress else None)
    shape = _shape(cfg, model_uri)
    running = _running_version(s.app_name)
    replicas = s.num_replicas if s.autoscaling is None else s.autoscaling.min_replicas
    per_replica = {"CPU": 1.0, "GPU": float(_gpus_per_replica(s.use_gpu))}
    fits, room = room_for(per_replica, replicas)
    in_place = bool(running and running.startswith(f"{shape}:") and not fits)
    if in_place:
        # No room for a second set of replicas, and only the model changes: the running
        # replicas load it in place (reconfigure: the old model answers until the new is warm).
        say(f"{room}: no room to swap replicas, so the running one(s) load the new model in place")
        application = build_app(cfg, model_uri, revision=revision or f"reload-{time.time_ns()}",
                                version=running)
    else:
        application = build_app(cfg, model_uri, revision=revision, version=f"{shape}:{time.time_ns()}")
    url = client_url(_running_http(s, say))
    say(f"deploying {model_uri} as '{s.app_name}' ...")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_status, args=(s.app_name, say, stop), daemon=True)
    watcher.start()
    try:
        handle = serve.run_many([serve.RunTarget(target=application, name=s.app_name, route_prefix=s.route_prefix)],
                                wait_for_applications_running=False)[0]
        _wait_running(s, model_uri, swap=bool(running) and not in_place, room=room if not fits else None)
    except RuntimeError as exc:
        tail = "\n".join(str(exc).strip().splitlines()[-12:])
        raise RaypipeError(f"deploying {model_uri} failed:\n{tail}") from None
    finally:
        stop.set()
    _wait_ready(url, token, ready_timeout_s)
    # (A Serve started here lists its replicas' ports at once; allow a moment for the controller.)
    direct = _direct_urls(s, url, token, say, timeout_s=2.0 if fresh_serve else 0.0) if s.direct_ingress else []
    served = Served(url=url, app_name=s.app_name, model_uri=model_uri, handle=handle,
                    started_ray=started_ray, startup_s=time.perf_counter() - start, direct_urls=direct)
    say(f"ready in {served.startup_s:.1f} s: POST {url}/predict  (docs: {url}/docs)")
    for d in direct:
        say(f"  direct to a replica, without the proxy hop: POST {d}/predict")
    if blocking:
        say("serving; press Ctrl-C to stop")
        restore = _sigterm_as_interrupt()
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            say("stopping ...")
        finally:
            served.shutdown()
            restore()
    return served


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Let `kill`/`docker stop` (SIGTERM) take the same clean path as Ctrl-C."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def shutdown(served: Served | str | None = None) -> None:
    """Stop serving: a :class:`Served` (and the Ray that ``deploy`` started for it), an app by
    name, or with no argument every Serve application on the cluster."""
    if served is None:
        serve.shutdown()
        return
    if isinstance(served, str):
        serve.delete(served)
        return
    if served.started_ray:
        import ray

        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(served.app_name)


# --------------------------------------------------------------------------- CLI


def serve_config_doc(cfg: RaypipeConfig, model_uri: str) -> dict[str, Any]:
    """A Serve config (for ``serve deploy``/``serve run``) equivalent to ``deploy(cfg, uri)``."""
    s = cfg.serve
    uri = _normalise_uri(model_uri)
    settings, tracking = _replica_settings(cfg, uri, None)
    spec = ModelSpec(model_uri=uri, tracking_uri=tracking, revision="1")
    return {
        "http_options": {"host": s.host, "port": s.port},
        "applications": [
            {
                "name": s.app_name,
                "route_prefix": s.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {
                    "model_uri": uri,
                    "tracking_uri": tracking,
                    # host/port/app/prefix are set above, where Serve reads them
                    "serve": {k: v for k, v in settings.items() if k not in {
                        "model_uri", "host", "port", "app_name", "route_prefix"}},
                },
                "deployments": [{"name": DEPLOYMENT_NAME, "user_config": spec.model_dump(mode="json")}],
            }
        ],
    }


def write_serve_config(cfg: RaypipeConfig, model_uri: str, path: str | os.PathLike[str]) -> Path:
    from raypipe import __version__

    out = Path(path)
    header = (
        f"# Ray Serve config written by `raypipe serve --emit-config` (raypipe {__version__}).\n"
        "# Deploy it with `serve deploy <this file>` (or try it with `serve run <this file>`).\n"
        "# After the registry alias moves, bump deployments[0].user_config.revision (or edit its\n"
        "# model_uri) and `serve deploy` again: live replicas reload the model without a restart.\n"
        "# Editing `args` rebuilds the app instead (replicas are replaced).\n"
        "# A bearer token (serve.auth_token_env) is read from the replicas' environment; it is\n"
        "# never written here.\n"
    )
    body = yaml.safe_dump(serve_config_doc(cfg, model_uri), sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + body, encoding="utf-8")
    return out


def _with_serve(cfg: RaypipeConfig, **updates: Any) -> RaypipeConfig:
    tree = cfg.model_dump(mode="json")
    tree["serve"].update(updates)
    return config_from_dict(tree)


def main(args: Any, cfg: RaypipeConfig) -> int:
    """``raypipe serve MODEL [--host --port --replicas --gpu --emit-config PATH]``."""
    updates: dict[str, Any] = {}
    if getattr(args, "host", None):
        updates["host"] = args.host
    if getattr(args, "port", None):
        updates["port"] = args.port
    if getattr(args, "replicas", None):
        updates.update(num_replicas=args.replicas, autoscaling=None)
    if getattr(args, "gpu", False):
        updates["use_gpu"] = True
    if updates:
        cfg = _with_serve(cfg, **updates)
    model_uri = getattr(args, "model", None) or cfg.serve.model_uri
    if not model_uri:
        raise ConfigError("no model to serve: give MODEL (models:/name@alias or a checkpoint dir) "
                          "or set serve.model_uri in the config")
    if getattr(args, "emit_config", None):
        path = write_serve_config(cfg, model_uri, args.emit_config)
        print(f"wrote {path}; deploy it with: serve deploy {path}")
        return 0
    deploy(cfg, model_uri, blocking=True, progress=lambda msg: print(msg, flush=True))
    return 0
