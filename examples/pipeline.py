"""The whole job: tune (or train) -> evaluate -> register/promote -> serve -> sample predictions.

    ray job submit --working-dir . -- python examples/pipeline.py --config examples/configs/quickstart.yaml
    python examples/pipeline.py --config examples/configs/quickstart.yaml --smoke-test --no-serve

Serving here is a check that the champion answers over HTTP; the app is removed when the job
ends. For a long-lived endpoint use `raypipe serve models:/<name>@champion` or `serve deploy`.
"""

from __future__ import annotations

import sys

import _common


def pipeline(cfg, args):
    from raypipe.pipeline import run

    return run(cfg, serve=not args.no_serve)


def options(p):
    p.add_argument("--no-serve", action="store_true", help="stop after registering and promoting")


if __name__ == "__main__":
    sys.exit(_common.main(__doc__.splitlines()[0], pipeline, extra=options))
