"""Fine-tune once on Ray Train and log the run to MLflow.

    ray job submit --working-dir . -- python examples/train.py --config examples/configs/quickstart.yaml
    python examples/train.py --config examples/configs/quickstart.yaml train.lr=3e-5 --smoke-test
"""

from __future__ import annotations

import sys

import _common


def train(cfg, args):
    import raypipe

    return raypipe.train(cfg)


if __name__ == "__main__":
    sys.exit(_common.main(__doc__.splitlines()[0], train))
