"""The bare baseline of benchmark 4: one uvicorn process serving raypipe's own FastAPI app
(``raypipe.api.create_app``) around the same ``Predictor`` — no Ray, no batching, each request
predicted in a worker thread.

    python -m bench.bare_server CHECKPOINT_DIR --port 8123
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_server")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    a = p.parse_args(argv)

    import torch
    import uvicorn

    from raypipe.api import ModelSlot, create_app
    from raypipe.config import ServeConfig
    from raypipe.predict import Predictor

    if a.threads:
        torch.set_num_threads(a.threads)
    slot = ModelSlot()
    slot.install(Predictor.from_dir(a.checkpoint, device=a.device))  # warm-up included, as in Serve
    app = create_app(slot, ServeConfig())
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
