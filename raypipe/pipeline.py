"""The whole job in one call: (tune | train) -> evaluate -> register/promote -> serve -> sample.

``raypipe run cfg.yaml`` and the quickstart notebook call :func:`run`. The data is read and
split once and handed to every stage. Each stage hands a value to the next
(``TuneResult``/``TrainResult`` -> checkpoint -> ``EvalResult`` + ``RegisterResult`` -> a served
URL); the sweep and the single-run branch are evaluated and registered the same way
(:func:`evaluate_and_register`), and no stage reaches into another's internals.
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
    direct_urls: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    dashboard_url: str | None = None
    data_checks: dict[str, Any] = field(default_factory=dict)
    log_file: str | None = None

    @property
    def champion_uri(self) -> str:
        r = self.cfg.registry
        return f"models:/{r.model_name}@{r.alias}"

    def summary(self) -> str:
        cfg = self.cfg
        m = self.evaluation.metrics if self.evaluation else {}
        lines = ["", "=" * 72, f"raypipe pipeline summary ({cfg.task})", "=" * 72]
        if m:
            shown = "   ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "test_loss")
            lines.append(f"{shown}     ({self.evaluation.num_examples} held-out examples)")
        if self.data_checks.get("test_overlap_warning"):  # share above data.test_overlap_threshold
            c = self.data_checks
            lines.append(f"WARNING         {c['test_in_train']} of {c['rows']['test']} test examples also occur in "
                         f"training ({c['test_overlap_share']:.1%}, above data.test_overlap_threshold "
                         f"{c['test_overlap_threshold']:.1%}): the test score is inflated (data.dedupe: across drops them)")
        if self.tune is not None:
            t = self.tune
            lines.append(f"sweep           {t.sweep_name}: {len(t.trials)} trials, best {t.best_trial} "
                         f"({t.metric}={t.best_value:.4f})" if t.best_value is not None else f"sweep {t.sweep_name}")
            lines.append(f"                best config {t.best_config}")
            lines.append(f"MLflow runs     sweep (parent) {t.parent_run_id}")
            lines.append(f"                best trial     {t.best_run_id}")
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
                mark = "ok " if s["ok"] else "MISS"
                lines.append(f"  [{mark}] {s['predicted']:<22} (true: {s['expected']})  {s['input'][:60]!r}")
            for url in self.direct_urls:
                lines.append(f"replica URL     {url}  (direct, without the proxy hop)")
        lines += [
            "",
            "where things are",
            f"  workdir         {cfg.workdir_path}",
            f"  MLflow store    {redact_uri(cfg.resolved_tracking_uri)}",
            f"  Ray results     {cfg.resolved_storage_path}",
            *([f"  full log        {self.log_file}   (raypipe -v shows it all on the console)"] if self.log_file else []),
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


def evaluate_and_register(cfg: RaypipeConfig, checkpoint: str, *, splits: Any, source_run_id: str | None,
                          force: bool = False) -> tuple[Any, Any]:
    """The best checkpoint of a training run or a sweep, evaluated on the held-out test split and
    registered (the gate decides about the alias). The same for both, so a sweep's champion and a
    single run's are judged alike."""
    from raypipe.evaluation import run as evaluate
    from raypipe.registration import run as register

    from raypipe import console

    console.say("evaluating the best checkpoint on the held-out test split")
    evaluation = evaluate(checkpoint, cfg, splits=splits)
    registration = register(checkpoint, cfg, force=force, evaluation=evaluation, source_run_id=source_run_id,
                            fingerprint=splits.fingerprint, data_checks=splits.checks)
    console.say(f"registered {registration.uri}: {registration.decision.reason}")
    return evaluation, registration


def run(cfg: RaypipeConfig, *, serve: bool = True, keep_serving: bool = False, samples: int = 5) -> PipelineResult:
    """Run every stage the config describes; serve the champion and query it when ``serve``."""
    from raypipe import console
    from raypipe.data import load_splits
    from raypipe.runtime import ensure_ray

    out = PipelineResult(cfg=cfg)
    clock = time.perf_counter()
    names = ["sweep" if cfg.tune.search_space else "training", "evaluate and register", *(["serve"] if serve else [])]

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        out.stage_seconds[stage] = now - clock
        clock = now

    cfg = cfg.with_absolute_paths()
    from raypipe.tracking import preflight_store

    preflight_store(cfg)  # a Ray job's throwaway dir or a wrong server password stops us here
    splits = load_splits(cfg.data, cfg.task)  # once per run, and before any Ray work
    splits.measure_lengths(cfg.model.name, cfg.data.max_length)
    print(splits.report())
    out.data_checks = splits.checks
    started = ensure_ray(cfg)
    import ray

    out.dashboard_url = _dashboard_url()
    log = console.log_file()
    out.log_file = str(log) if log else None
    lap("start")
    if cfg.tune.search_space:
        from raypipe.tuning import run as tune
        from raypipe.tuning import trial_count

        console.stage(1, len(names), f"sweep of {trial_count(cfg)} trial(s) (tune.search_space)")

        out.tune = tune(cfg, splits=splits)
        best, source_run = out.tune.best_checkpoint, out.tune.best_run_id
        lap("tune")
    else:
        console.stage(1, len(names), "training (no tune.search_space given)")
        from raypipe.training import run as train

        out.train = train(cfg, splits=splits)
        best, source_run = out.train.best_checkpoint, out.train.mlflow_run_id
        lap("train")
    console.stage(2, len(names), "evaluate and register")
    out.evaluation, out.registration = evaluate_and_register(cfg, best, splits=splits, source_run_id=source_run)
    lap("evaluate+register")
    if serve and out.registration is None:
        console.say(f"stage 3/{len(names)} skipped: nothing was registered to serve")
    if serve and out.registration is not None:
        console.stage(3, len(names), f"serving {out.champion_uri}")
        from raypipe import tasks
        from raypipe.client import predict_http
        from raypipe.serve import deploy

        console.quiet_libraries()  # Ray Serve's console handler, installed by its import

        served = deploy(cfg, out.champion_uri, progress=lambda m: print(f"[raypipe] serve: {m}"))
        out.served_url = served.url
        out.direct_urls = list(served.direct_urls)
        try:
            task = tasks.get(splits.task)
            picks = _sample(splits.test, task, samples, cfg.data.split_seed)
            schema = out.evaluation.schema
            field = {"pair": "pairs", "tokens": "tokens"}.get(str(schema.get("inputs")), "texts")
            if splits.task == "sft":  # a language model answers on its OpenAI chat route
                max_tokens = min(int(schema.get("max_new_tokens") or 128), cfg.serve.max_tokens)
                answer = {"predictions": _chat_http(served.url, [inp for inp, _ in picks], _token(cfg), max_tokens)}
            else:
                answer = predict_http(served.url, [inp for inp, _ in picks], token=_token(cfg), field=field)
            for (inp, expected), p in zip(picks, answer["predictions"]):
                predicted = task.describe(p, schema)
                shown_true, ok = task.judge(expected, p, schema)
                if isinstance(inp, list) and inp and isinstance(inp[0], dict):  # chat turns (sft)
                    text = " / ".join(f"{m['role']}: {m['content']}" for m in inp)
                else:
                    text = inp if isinstance(inp, str) else (" / " if isinstance(inp, tuple) else " ").join(inp)
                out.samples.append({"input": text, "expected": shown_true, "predicted": predicted, "ok": ok,
                                    "prediction": p})
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


def _chat_http(url: str, prompts: list[Any], token: str | None, max_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of a served language model through ``POST /v1/chat/completions``, one
    request per prompt (a string is one user turn; a list is the chat's turns)."""
    import httpx

    from raypipe.errors import RaypipeError

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
    out = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        r = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=600,
                       json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        if r.status_code != 200:
            raise RaypipeError(f"the served model answered {r.status_code}: {r.text[:300]}")
        out.append({"generation": r.json()["choices"][0]["message"]["content"].strip()})
    return out


def _sample(frame: Any, task: Any, n: int, seed: int) -> list[tuple[Any, Any]]:
    """``n`` held-out examples as (input, target); one per stratum (class) first, so the demo
    shows every label it can."""
    key = task.stratify_key(frame)
    if key is not None:
        order = frame.assign(_k=key.to_numpy()).groupby("_k", sort=True).sample(n=1, random_state=seed)
        rest = frame.drop(order.index)
        picked = [*order.index, *rest.sample(frac=1.0, random_state=seed).index][:n]
    else:
        picked = list(frame.sample(n=min(n, len(frame)), random_state=seed).index)
    rows = frame.loc[picked]
    clip = lambda t: " ".join(t.split())[:500] if isinstance(t, str) else t  # noqa: E731
    inputs = [tuple(clip(t) for t in x) if isinstance(x, tuple) else clip(x) for x in task.inputs_of(rows)]
    return list(zip(inputs, rows["label"]))


def _token(cfg: RaypipeConfig) -> str | None:
    import os

    env = cfg.serve.auth_token_env
    return os.environ.get(env) if env else None


def _dashboard_url() -> str | None:
    try:

        from ray._private.worker import get_dashboard_url  # ray.worker's is deprecated

        return get_dashboard_url() or None
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
