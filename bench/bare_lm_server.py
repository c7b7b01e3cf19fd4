"""The bare baseline of benchmark 12's generation part: one uvicorn process serving raypipe's own
FastAPI app (``raypipe.api.create_app``, whose OpenAI routes are ``raypipe.openai_api``) around
the same ``Predictor`` and the same ``GenerationEngine`` a Serve replica builds — the same batch
size and wait, one inference thread, its batches recorded in ``/stats`` — with no Ray.

    python -m bench.bare_lm_server SFT_CHECKPOINT_DIR --port 8124 --threads 1
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_lm_server")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default); "
                   "a Serve replica has 1 CPU, so Ray starts it with one thread")
    a = p.parse_args(argv)

    from concurrent.futures import ThreadPoolExecutor

    import torch
    import uvicorn

    from raypipe.api import BatchStats, ModelSlot, create_app
    from raypipe.config import ServeConfig
    from raypipe.generation import GenerationEngine
    from raypipe.predict import Predictor

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = ServeConfig()  # the defaults, as the benchmark deploys the Serve side
    stats = BatchStats()
    # As raypipe.serve.ModelService builds it: one inference thread, each batch recorded.
    engine = GenerationEngine(cfg.max_batch_size, cfg.batch_wait_timeout_s,
                              executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="bare-infer"),
                              on_batch=lambda n, seconds: stats.record(n, n, seconds))
    slot = ModelSlot()
    slot.install(Predictor.from_dir(a.checkpoint, device=a.device))  # warm-up included, as in Serve
    app = create_app(slot, cfg, stats=stats, generation=engine)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
