"""The ``raypipe`` command line.

Kept light on purpose: this module imports only the standard library at load time, so
``raypipe --help`` never pays for torch, ray or mlflow. Each command imports its stage lazily.
Errors the user can fix (:class:`~raypipe.errors.RaypipeError`) print a message and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USAGE = 2

_EPILOG = """\
examples:
  raypipe validate examples/configs/quickstart.yaml
  raypipe train examples/configs/quickstart.yaml train.lr=3e-5 scaling.num_workers=2
  raypipe tune examples/configs/quickstart.yaml tune.num_samples=8
  raypipe evaluate models:/raypipe-classifier@champion --config examples/configs/quickstart.yaml
  raypipe serve models:/raypipe-classifier@champion --config examples/configs/quickstart.yaml
  raypipe predict --url http://127.0.0.1:8000 "Shares rose after the results"
  raypipe run examples/configs/quickstart.yaml        # the whole pipeline
  raypipe export models:/raypipe-classifier@champion --merge -o merged/   # a LoRA model as plain transformers

Overrides are dotted key paths with YAML values: train.lr=3e-5 data.text_columns=[title,body].
"""


def _config(args: argparse.Namespace) -> Any:
    from raypipe.config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "overrides", None) or [])


def _cmd_validate(args: argparse.Namespace) -> int:
    from raypipe.config import flatten

    cfg = _config(args)
    if args.check_data:
        from raypipe.data import load_splits

        from raypipe.errors import RaypipeError

        splits = load_splits(cfg.data, cfg.task)
        try:  # the truncated share needs the model's tokenizer
            splits.measure_lengths(cfg.model.name, cfg.data.max_length)
        except (RaypipeError, OSError, ValueError) as exc:
            print(f"data: the share of texts past max_length is not measured: no tokenizer for {cfg.model.name} ({exc})")
        print(splits.report())
    if args.show:
        for key, value in flatten(cfg.model_dump(mode="json")).items():
            print(f"{key} = {value}")
    print(f"OK: {args.config or '<defaults>'} is a valid raypipe config")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from raypipe import console
    from raypipe.training import run

    cfg = _config(args)
    with console.run_log(cfg, "train") as log:
        result = run(cfg)
        print(result.summary())
        print(f"full log: {log}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from raypipe.data import load_splits
    from raypipe.pipeline import evaluate_and_register
    from raypipe.tuning import run

    from raypipe import console

    cfg = _config(args).with_absolute_paths()
    with console.run_log(cfg, "tune") as log:
        splits = load_splits(cfg.data, cfg.task)
        print(splits.report())
        result = run(cfg, resume=args.resume, splits=splits)
        print(result.summary())
        if not args.no_register:
            evaluate_and_register(cfg, result.best_checkpoint, splits=splits, source_run_id=result.best_run_id)
        print(f"full log: {log}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from raypipe.evaluation import run

    result = run(args.model, _config(args), data_path=args.data, log_to_mlflow=not args.no_log)
    print(result.summary())
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from raypipe.registration import run

    result = run(args.checkpoint, _config(args), name=args.name, force=args.force)
    print(result.summary())
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from raypipe.registry import list_models

    # A missing store is an error here (exit 2): usually a wrong --config or tracking URI.
    print(list_models(_config(args), name=args.name, missing_ok=False))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from raypipe.serve import main as serve_main

    return serve_main(args, _config(args))


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from raypipe.errors import ConfigError

    if bool(args.url) == bool(args.model):
        raise SystemExit("raypipe predict: give exactly one of --url or --model")
    if args.input or args.output:
        return _predict_files(args)
    if not args.texts:
        raise ConfigError("raypipe predict: give texts to predict, or --input FILE --output FILE")
    inputs: list[Any] = list(args.texts)
    if args.pairs:
        if len(inputs) % 2:
            raise ConfigError(f"--pairs: give texts two at a time (a b a b ...); got {len(inputs)}")
        inputs = [(inputs[i], inputs[i + 1]) for i in range(0, len(inputs), 2)]
    if args.url:
        from raypipe.client import predict_http

        token = os.environ.get(args.token_env) if args.token_env else None
        preds = predict_http(args.url, inputs, top_k=args.top_k, token=token)["predictions"]
        describe = None
    else:
        from raypipe.registry import load_predictor

        tracking_uri = _config(args).resolved_tracking_uri if args.model.startswith("models:/") else None
        predictor = load_predictor(args.model, tracking_uri=tracking_uri)
        preds = predictor.predict(inputs, top_k=args.top_k)
        describe = lambda p: predictor.task.describe(p, predictor.schema)  # noqa: E731
    if args.json:
        print(json.dumps(preds, indent=2))
    else:
        for item, p in zip(inputs, preds):
            text = item if isinstance(item, str) else " | ".join(item)
            short = text if len(text) <= 60 else text[:57] + "..."
            shown = describe(p) if describe else json.dumps(p, separators=(",", ":"))[:80]
            print(f"{shown}\t{short}")
    return 0


def _predict_files(args: argparse.Namespace) -> int:
    """``--input``/``--output``: batch scoring on Ray Data (:mod:`raypipe.batch`)."""
    import json

    from raypipe.config import load_config

    from raypipe.errors import ConfigError

    if args.url or not (args.input and args.output):
        raise ConfigError("raypipe predict: batch scoring takes --model, --input and --output (not --url)")
    given = [*args.texts, *(args.overrides or [])]
    overrides = [t for t in given if "=" in t]
    if len(overrides) != len(given):
        raise ConfigError("raypipe predict: with --input, positional arguments are key.path=value overrides, "
                         f"not texts: {[t for t in given if '=' not in t]}")
    for flag, key in (("batch_size", "predict.batch_size"), ("concurrency", "predict.concurrency"),
                      ("num_cpus", "predict.num_cpus"), ("pair_column", "data.text_pair_column"),
                      ("tokens_column", "data.tokens_column"), ("format", "data.format")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.text_column:
        overrides.append(f"data.text_columns={json.dumps(args.text_column)}")
    if args.truncate:
        overrides.append("predict.overlong=truncate")
    cfg = load_config(args.config, overrides)
    from raypipe.batch import run

    run(args.model, args.input, args.output, cfg, overwrite=args.overwrite, log_run=not args.no_log)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from raypipe.registration import export

    cfg = _config(args)
    out = export(args.model, args.output, merge=args.merge, tracking_uri=cfg.resolved_tracking_uri,
                 overwrite=args.overwrite)
    print(f"exported {args.model} to {out}" + (" (adapter merged into its base)" if args.merge else ""))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from raypipe import console
    from raypipe.pipeline import run

    cfg = _config(args)
    with console.run_log(cfg, "run"):
        result = run(cfg, serve=not args.no_serve, keep_serving=args.keep_serving)
        print(result.summary())
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from raypipe.reproduce import run

    uri = _config(args).resolved_tracking_uri if args.config else None
    result = run(args.target, tracking_uri=uri, allow_data_change=args.allow_data_change, overrides=args.overrides)
    print(result.summary())
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    cfg = _config(args)
    if cfg.resolved_tracking_uri.startswith(("http://", "https://")):  # a server has its own UI
        from raypipe.tracking import redact_uri

        print(f"MLflow UI: {redact_uri(cfg.resolved_tracking_uri)}  (the configured tracking server; nothing to start)")
        return 0
    cmd = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", cfg.resolved_tracking_uri,
        "--default-artifact-root", cfg.resolved_artifact_location,
        "--host", args.host, "--port", str(args.port),
        "--workers", str(args.workers),
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="YAML config file")
    else:
        p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypipe",
        description="Fine-tune, track, tune, register and serve Hugging Face transformers models on Ray "
        "(classification, multi-label, regression, sentence pairs, named entities).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from raypipe import __version__

    parser.add_argument("--version", action="version", version=f"raypipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, Tune's, MLflow's and the workers' output too (also RAYPIPE_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    p = add("validate", _cmd_validate, "check a config (and optionally its data) without running anything")
    _add_config(p)
    p.add_argument("--show", action="store_true", help="print the resolved config, one key per line")
    p.add_argument("--check-data", action="store_true", help="also read and split the data")

    p = add("train", _cmd_train, "fine-tune on Ray Train and log the run to MLflow")
    _add_config(p)

    p = add("tune", _cmd_tune, "search hyperparameters on Ray Tune; evaluate, register and promote the best")
    _add_config(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--no-register", action="store_true", help="stop after the sweep")

    p = add("evaluate", _cmd_evaluate, "held-out metrics for a checkpoint dir or models:/ URI")
    p.add_argument("model", help="checkpoint dir, models:/name@alias or models:/name/VERSION")
    _add_config(p, required=False)
    p.add_argument("--data", help="labelled file/folder to evaluate on (default: the config's test split)")
    p.add_argument("--no-log", action="store_true", help="do not log the evaluation to MLflow")

    p = add("register", _cmd_register, "register a checkpoint in the MLflow Model Registry")
    p.add_argument("checkpoint", help="checkpoint dir")
    _add_config(p, required=False)
    p.add_argument("--name", help="registered model name (default: registry.model_name)")
    p.add_argument("--force", action="store_true", help="move the alias even if the gate says no")

    p = add("models", _cmd_models, "list registered model versions, aliases and metrics")
    _add_config(p, required=False)
    p.add_argument("--name", help="only this registered model")

    p = add("serve", _cmd_serve, "serve a model over HTTP with Ray Serve (POST /predict)")
    p.add_argument("model", nargs="?", help="models:/ URI or checkpoint dir (default: serve.model_uri)")
    _add_config(p, required=False)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, help="number of replicas")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--emit-config", metavar="PATH", help="write a Serve config YAML for `serve deploy` and exit")

    p = add("predict", _cmd_predict, "predict for texts, offline (--model) or over HTTP (--url); "
            "score whole files on Ray Data (--input, --output)")
    p.add_argument("texts", nargs="*", help="texts (with --pairs: a b a b ... for a sentence-pair model); "
                   "with --input: key.path=value config overrides")
    p.add_argument("--pairs", action="store_true", help="the texts are sentence pairs, two at a time")
    p.add_argument("--model", help="checkpoint dir or models:/ URI (offline, no Ray)")
    p.add_argument("--url", help="base URL of a running raypipe server")
    p.add_argument("--config", "-c", help="config (for the tracking URI of models:/ URIs)")
    p.add_argument("--top-k", type=int, help="only the k most likely classes")
    p.add_argument("--token-env", default="RAYPIPE_TOKEN", help="env var with the bearer token")
    p.add_argument("--json", action="store_true", help="print JSON")
    b = p.add_argument_group("batch scoring (Ray Data)")
    b.add_argument("--input", help="CSV/TSV/JSON/JSONL/Parquet file, a folder of them, or a glob")
    b.add_argument("--output", help="file to write (.parquet, .csv, .tsv, .jsonl): the input's columns "
                   "+ pred_* columns, reject_reason, row_id, model_name, model_version")
    b.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    b.add_argument("--text-column", action="append", help="input column with the text (repeat to join "
                   "several; default: data.text_columns)")
    b.add_argument("--pair-column", help="second text of a sentence-pair model (default: text_pair)")
    b.add_argument("--tokens-column", help="word lists for a token-classification model")
    b.add_argument("--format", help="input format when the suffix does not tell (csv, tsv, json, jsonl, parquet)")
    b.add_argument("--batch-size", type=int, help="texts per forward pass (predict.batch_size)")
    b.add_argument("--concurrency", type=int, help="model actors (predict.concurrency)")
    b.add_argument("--num-cpus", type=float, help="CPUs per actor, also its threads (predict.num_cpus)")
    b.add_argument("--truncate", action="store_true", help="score texts over max_length truncated "
                   "instead of rejecting them")
    b.add_argument("--no-log", action="store_true", help="do not record the job as an MLflow run")
    p.set_defaults(overrides=[])

    p = add("export", _cmd_export, "write a model as a plain transformers dir (a LoRA adapter merged into its base)")
    p.add_argument("model", help="checkpoint dir, models:/name@alias or models:/name/VERSION")
    p.add_argument("--output", "-o", required=True, help="directory to write")
    p.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base weights")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it is not empty")
    p.add_argument("--config", "-c", help="config (for the tracking URI of models:/ URIs)")
    p.set_defaults(overrides=[])

    p = add("run", _cmd_run, "the whole pipeline: tune/train -> evaluate -> register -> serve")
    _add_config(p)
    p.add_argument("--no-serve", action="store_true", help="stop after registering")
    p.add_argument("--keep-serving", action="store_true", help="leave the server running")

    p = add("reproduce", _cmd_reproduce, "rebuild a run's config from MLflow, check its data, train again, "
            "compare metrics")
    p.add_argument("target", help="MLflow run id, or models:/name@alias / models:/name/VERSION")
    p.add_argument("--config", "-c", help="config (for its tracking URI; default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--allow-data-change", action="store_true", help="rerun even if the data's fingerprint changed")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides on top of the run's config")

    p = add("ui", _cmd_ui, "open the MLflow UI on the config's tracking store")
    _add_config(p, required=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (default 1: one person's UI; MLflow's own default of 4 starts "
                        "4 copies of MLflow, ~4x the memory and start-up on a laptop)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`raypipe serve URI --port 9000 serve.max_texts=8`),
    # which argparse leaves over once the positional list has been consumed.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from raypipe import console

    console.setup_logging(args.verbose)  # raypipe's progress on the console; -v: every library's too
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP request is not progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from raypipe.errors import RaypipeError

    try:
        return args.func(args)
    except RaypipeError as exc:
        print(f"raypipe {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"raypipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
