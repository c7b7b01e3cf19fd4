"""``raypipe reproduce <run id | models:/name@alias>``: rebuild a run's config from MLflow, check
that the data is still the data it saw, train it again and compare.

The config comes from the run's params (every run raypipe logs — a training run or a sweep
trial — holds the whole resolved config, flattened, secrets redacted): params that are config
keys are parsed back (``None``/booleans/numbers/lists as written), redacted values (``***``) are
left at their defaults, and the run's sweep search space is dropped (the trial's sampled values
are already in its params). Before any work the data is read and split with that config and its
fingerprint compared with the run's ``data.fingerprint`` tag: a different fingerprint means other
data (or other split settings), and reproducing is refused (ConfigError, exit 2) unless
``allow_data_change``. The rerun is a plain training run tagged ``raypipe.reproduces = <run id>``,
evaluated on the test split like the original; old and new metrics are printed side by side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from raypipe.errors import ConfigError

_NOT_CONFIG = ("data.train_size", "data.num_labels", "data.check.")


@dataclass
class ReproduceResult:
    source_run_id: str
    new_run_id: str | None
    fingerprint: str
    data_changed: bool
    old_metrics: dict[str, float] = field(default_factory=dict)
    new_metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        keys = sorted(k for k in self.old_metrics if k in self.new_metrics)
        lines = [f"Reproduction of run {self.source_run_id} (new run {self.new_run_id})"
                 + ("  [data changed: --allow-data-change]" if self.data_changed else ""),
                 f"  {'metric':<22} {'original':>10} {'reproduced':>11} {'diff':>9}"]
        for k in keys:
            old, new = self.old_metrics[k], self.new_metrics[k]
            lines.append(f"  {k:<22} {old:>10.4f} {new:>11.4f} {new - old:>+9.4f}")
        if not keys:
            lines.append("  (the original run has no test metrics to compare with)")
        return "\n".join(lines)


def _parse(text: str) -> Any:
    import yaml

    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_from_run(params: dict[str, str], overrides: list[str] | None = None) -> Any:
    """The run's params as a config (only keys the config knows; redacted values left out).

    A param is the value's ``str()``: keys whose default is a string keep the text as is, others
    are parsed back as YAML (numbers, booleans, lists); a value the config then rejects is retried
    as the plain text."""
    from raypipe.config import RaypipeConfig, apply_overrides, config_from_dict, flatten

    defaults = flatten(RaypipeConfig().model_dump(mode="json"))
    raw: dict[str, str] = {}
    tree: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    for key, text in sorted(params.items()):
        if key.startswith(_NOT_CONFIG) or text == "***" or key.startswith("tune.search_space"):
            continue
        if key in defaults or any(key.startswith(k + ".") for k in defaults if isinstance(defaults[k], dict)):
            raw[key] = text
            put(key, text if isinstance(defaults.get(key), str) else _parse(text))
    tree.setdefault("tune", {})["search_space"] = {}
    if overrides:
        tree = apply_overrides(tree, overrides)
    for _ in range(len(raw) + 1):
        try:
            return config_from_dict(tree, source="the run's params")
        except ConfigError as exc:
            bad = [k for k in raw if f"{k}:" in str(exc)]
            if not bad:
                raise
            for k in bad:
                put(k, raw.pop(k))
    return config_from_dict(tree, source="the run's params")


def _find_run(client: Any, target: str) -> tuple[str, dict[str, float]]:
    """(run id, the original's test metrics) of a run id or a models:/ URI."""
    if target.startswith("models:/"):
        from raypipe.registry import _find_version, parse_models_uri

        name, alias, version = parse_models_uri(target)
        mv = _find_version(client, name, alias, version)
        metrics = {k: float(v) for k, v in (mv.tags or {}).items() if k.startswith("test_")}
        return mv.run_id, metrics
    run = client.get_run(target)
    return target, {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}


def run(target: str, *, tracking_uri: str | None = None, allow_data_change: bool = False,
        overrides: list[str] | None = None) -> ReproduceResult:
    from raypipe.data import load_splits
    from raypipe.registry import _client, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    try:
        run_id, old_metrics = _find_run(client, target)
        source = client.get_run(run_id)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow's "not found" and friends, said plainly
        msg = getattr(exc, "message", None) or str(exc)
        raise ConfigError(f"reproduce: cannot read '{target}' from the MLflow store: {msg}") from None
    cfg = config_from_run(source.data.params, [*(overrides or []), f"tracking.tracking_uri={uri}"])
    if cfg.workdir and not os.path.isabs(os.path.expanduser(cfg.workdir)):
        cfg = cfg.model_copy(update={"workdir": os.path.abspath(cfg.workdir)})
    recorded = source.data.tags.get("data.fingerprint")
    splits = load_splits(cfg.data, cfg.task)
    changed = bool(recorded) and recorded != splits.fingerprint
    if changed and not allow_data_change:
        raise ConfigError(
            f"reproduce: the data changed since run {run_id}: its fingerprint was {recorded[:12]}, "
            f"{cfg.data.path} now gives {splits.fingerprint[:12]} (other rows or other split settings). "
            "Point data.path at the original data, or pass --allow-data-change to rerun on this data."
        )
    from raypipe.evaluation import run as evaluate
    from raypipe.training import run as train

    print(f"[raypipe] reproducing run {run_id} ({source.info.run_name}) with its config; data fingerprint "
          f"{splits.fingerprint[:12]}" + (" (CHANGED)" if changed else " (unchanged)"))
    out = train(cfg, splits=splits)
    if out.mlflow_run_id:
        client.set_tag(out.mlflow_run_id, "raypipe.reproduces", run_id)
    new_metrics: dict[str, float] = {}
    if out.best_checkpoint:
        new_metrics = dict(evaluate(out.best_checkpoint, cfg, splits=splits).metrics)
    return ReproduceResult(source_run_id=run_id, new_run_id=out.mlflow_run_id, fingerprint=splits.fingerprint,
                           data_changed=changed, old_metrics=old_metrics, new_metrics=new_metrics)
