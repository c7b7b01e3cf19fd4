"""The whole job in one call: (tune | train) -> evaluate -> register/promote -> serve -> sample.

``raypipe run cfg.yaml`` and the quickstart notebook call :func:`run`. Each stage hands a value
to the next (``TuneResult``/``TrainResult`` -> checkpoint -> model URI -> a served URL); no stage
reaches into another's internals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from raypipe.config import RaypipeConfig
from raypipe.tracking import redact_uri


@dataclass
class PipelineResult:
    cfg: RaypipeConfig
    tune: Any = None
    train: Any = None
    evaluation: Any = None
    registration: Any = None
    served_url: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    dashboard_url: str | None = None

    @property
    def champion_uri(self) -> str:
        r = self.cfg.registry
        return f"models:/{r.model_name}@{r.alias}"

    def summary(self) -> str:
        cfg = self.cfg
        m = self.evaluation.metrics if self.evaluation else {}
        lines = ["", "=" * 72, "raypipe pipeline summary", "=" * 72]
        if m:
            lines.append(f"test accuracy   {m['test_accuracy']:.4f}     test macro-F1   {m['test_macro_f1']:.4f}"
                         f"     ({self.evaluation.num_examples} held-out examples)")
        if self.tune is not None:
            t = self.tune
            lines.append(f"sweep           {t.sweep_name}: {len(t.trials)} trials, best {t.best_trial} "
                         f"({t.metric}={t.best_value:.4f})" if t.best_value is not None else f"sweep {t.sweep_name}")
            lines.append(f"                best config {t.best_config}")
            lines.append(f"MLflow runs     sweep (parent) {t.parent_run_id}")
            best_run = next((x.get("mlflow_run_id") for x in t.trials if x["trial_id"] == t.best_trial), None)
            lines.append(f"                best trial     {best_run}")
        if self.train is not None:
            lines.append(f"MLflow runs     training       {self.train.mlflow_run_id}")
        if self.evaluation is not None:
            lines.append(f"                evaluation     {self.evaluation.run_id}")
        if self.registration is not None:
            reg = self.registration
            lines.append(f"model           {reg.uri}  ({reg.decision.reason})")
            lines.append(f"champion        {self.champion_uri}")
        if self.samples:
            lines.append(f"served at       {self.served_url}  — sample predictions over HTTP:")
            for s in self.samples:
                mark = "ok " if s["label"] == s["expected"] else "MISS"
                lines.append(f"  [{mark}] {s['label']:<14} {s['score']:.3f}  (true: {s['expected']})  {s['text'][:60]!r}")
        lines += [
            "",
            "where things are",
            f"  workdir         {cfg.workdir_path}",
            f"  MLflow store    {redact_uri(cfg.resolved_tracking_uri)}",
            f"  Ray results     {cfg.resolved_storage_path}",
            "next",
            "  MLflow UI       raypipe ui --config <this config>     (http://127.0.0.1:5000)",
        ]
        if self.dashboard_url:
            lines.append(f"  Ray dashboard   http://{self.dashboard_url}  (while Ray runs)")
        lines += [
            f"  serve again     raypipe serve {self.champion_uri} --config <this config>",
            f"  predict         raypipe predict --model {self.champion_uri} --config <this config> \"some text\"",
            "timings         " + ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_seconds.items()),
        ]
        return "\n".join(lines)


def run(cfg: RaypipeConfig, *, serve: bool = True, keep_serving: bool = False, samples: int = 5) -> PipelineResult:
    """Run every stage the config describes; serve the champion and query it when ``serve``."""
    from raypipe.data import load_splits
    from raypipe.runtime import ensure_ray

    out = PipelineResult(cfg=cfg)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        out.stage_seconds[stage] = now - clock
        clock = now

    splits = load_splits(cfg.data)  # fail on bad data before any Ray work
    started = ensure_ray(cfg)
    import ray

    out.dashboard_url = getattr(ray.get_runtime_context(), "dashboard_url", None) or _dashboard_url()
    lap("start")
    if cfg.tune.search_space:
        print(f"[raypipe] stage 1/3: sweep of {cfg.tune.num_samples} trial(s) (tune.search_space)")
        from raypipe.tuning import run as tune

        out.tune = tune(cfg)
        out.evaluation, out.registration = out.tune.evaluation, out.tune.registration
        lap("tune+evaluate+register")
    else:
        print("[raypipe] stage 1/3: training (no tune.search_space given)")
        from raypipe.evaluation import run as evaluate
        from raypipe.registry import register_checkpoint
        from raypipe.training import run as train

        out.train = train(cfg, splits=splits)
        lap("train")
        out.evaluation = evaluate(out.train.best_checkpoint, cfg)
        out.registration = register_checkpoint(
            out.train.best_checkpoint, cfg, metrics=out.evaluation.metrics,
            source_run_id=out.train.mlflow_run_id, fingerprint=splits.fingerprint,
        )
        print(out.registration.summary())
        lap("evaluate+register")
    if serve and out.registration is not None:
        print(f"[raypipe] stage 3/3: serving {out.champion_uri}")
        from raypipe.client import predict_http
        from raypipe.serve import deploy

        served = deploy(cfg, out.champion_uri, progress=lambda m: print(f"[raypipe] serve: {m}"))
        out.served_url = served.url
        try:
            picks = _sample(splits.test, samples, cfg.data.split_seed)
            token = _token(cfg)
            answer = predict_http(served.url, [t for t, _ in picks], token=token)
            out.samples = [
                {"text": text, "expected": expected, "label": p["label"], "score": p["score"]}
                for (text, expected), p in zip(picks, answer["predictions"])
            ]
        finally:
            if keep_serving:
                print(f"[raypipe] still serving at {served.url} (Ctrl-C to stop)")
                _block_until_interrupt(served)
            else:
                served.shutdown()
        lap("serve")
    if started and ray.is_initialized():
        ray.shutdown()
    return out


def _sample(frame: Any, n: int, seed: int) -> list[tuple[str, str]]:
    """One text per class first, so the demo shows every label it can."""
    picked = frame.groupby("label", sort=True).sample(n=1, random_state=seed)
    rows = list(zip(picked["text"], picked["label"]))[:n]
    return [(" ".join(t.split())[:500], label) for t, label in rows]


def _token(cfg: RaypipeConfig) -> str | None:
    import os

    env = cfg.serve.auth_token_env
    return os.environ.get(env) if env else None


def _dashboard_url() -> str | None:
    try:
        import ray

        return ray.worker.get_dashboard_url() or None
    except Exception:
        return None


def _block_until_interrupt(served: Any) -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        served.shutdown()
