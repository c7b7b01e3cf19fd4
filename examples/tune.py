"""Search hyperparameters on Ray Tune (config `tune:` section); evaluate, register and promote the best.

    ray job submit --working-dir . -- python examples/tune.py --config examples/configs/quickstart.yaml
    python examples/tune.py --config examples/configs/quickstart.yaml tune.num_samples=4 --smoke-test
"""

from __future__ import annotations

import sys

import _common


def tune(cfg, args):
    import raypipe
    from raypipe.data import load_splits
    from raypipe.pipeline import evaluate_and_register

    cfg = cfg.with_absolute_paths()
    splits = load_splits(cfg.data, cfg.task)  # read once, for the sweep and for the winner's test
    sweep = raypipe.tune(cfg, resume=args.resume, splits=splits)
    if not args.no_register:
        print(sweep.summary())
        # tuning.run only sweeps: the winner is evaluated and registered as after a single run
        evaluate_and_register(cfg, sweep.best_checkpoint, splits=splits, source_run_id=sweep.best_run_id)
    return sweep


def options(p):
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep")
    p.add_argument("--no-register", action="store_true", help="stop after the sweep")


if __name__ == "__main__":
    sys.exit(_common.main(__doc__.splitlines()[0], tune, extra=options))
