"""Search hyperparameters on Ray Tune (config `tune:` section); evaluate, register and promote the best.

    ray job submit --working-dir . -- python examples/tune.py --config examples/configs/quickstart.yaml
    python examples/tune.py --config examples/configs/quickstart.yaml tune.num_samples=4 --smoke-test
"""

from __future__ import annotations

import sys

import _common


def tune(cfg, args):
    import raypipe

    return raypipe.tune(cfg, resume=args.resume)


def options(p):
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep")


if __name__ == "__main__":
    sys.exit(_common.main(__doc__.splitlines()[0], tune, extra=options))
