"""What the example scripts share: one argument parser, the --smoke-test shrink, error handling.

The scripts are made for ``ray job submit --working-dir . -- python examples/<script>.py ...``
and work just as well with a plain ``python examples/<script>.py ...``: raypipe joins the
cluster named by ``$RAY_ADDRESS`` (which Ray sets for every job) or starts a local Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# Ray's own examples take --smoke-test to finish in seconds; these are the knobs that shrink a run.
SMOKE_EPOCHS = 1
SMOKE_MAX_SAMPLES = 200
SMOKE_TRIALS = 2


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", "-c", required=True, help="raypipe YAML config")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.lr=3e-5")
    p.add_argument("--smoke-test", action="store_true",
                   help=f"a tiny run: {SMOKE_EPOCHS} epoch, at most {SMOKE_MAX_SAMPLES} examples, "
                        f"at most {SMOKE_TRIALS} trials")
    p.add_argument("--storage-path", default=os.environ.get("RAYPIPE_STORAGE_PATH"),
                   help="Ray Train/Tune storage shared by all nodes, s3://... or a shared filesystem "
                        "(default: $RAYPIPE_STORAGE_PATH, which cluster.yaml sets; else the config's)")
    return p


def smoke(cfg: Any) -> Any:
    """A copy of ``cfg`` shrunk for a smoke test; never larger than the config asked for."""
    from raypipe.config import config_from_dict

    tree = cfg.model_dump(mode="json")
    tree["train"]["epochs"] = min(cfg.train.epochs, SMOKE_EPOCHS)
    tree["data"]["max_samples"] = min(cfg.data.max_samples or SMOKE_MAX_SAMPLES, SMOKE_MAX_SAMPLES)
    tree["tune"]["num_samples"] = min(cfg.tune.num_samples, SMOKE_TRIALS)
    return config_from_dict(tree, source="--smoke-test")


def load(args: argparse.Namespace) -> Any:
    """The config from ``--config`` + overrides (+ ``--storage-path``), shrunk by ``--smoke-test``."""
    from raypipe.config import load_config

    overrides = list(args.overrides)
    if args.storage_path and not any(o.startswith("storage_path=") for o in overrides):
        overrides.insert(0, f"storage_path={args.storage_path}")
    cfg = load_config(args.config, overrides)
    return smoke(cfg) if args.smoke_test else cfg


def main(description: str, stage: Callable[[Any, argparse.Namespace], Any],
         argv: Sequence[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, load the config, run ``stage(cfg, args)``, print its summary.

    A :class:`~raypipe.errors.RaypipeError` (bad config, bad data, failed run) prints its message
    and exits with its code (2 for anything the user can fix, 1 for a run that failed), so
    ``ray job submit`` marks the job FAILED with a readable reason instead of a traceback.
    """
    p = parser(description)
    if extra:
        extra(p)
    args = p.parse_intermixed_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from raypipe.errors import RaypipeError

    try:
        cfg = load(args)
        if args.smoke_test:
            print("[raypipe] --smoke-test: "
                  f"epochs={cfg.train.epochs} max_samples={cfg.data.max_samples} tune.num_samples={cfg.tune.num_samples}")
        result = stage(cfg, args)
    except RaypipeError as exc:
        print(f"{os.path.basename(sys.argv[0]) or 'raypipe'}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(result.summary())
    return 0
