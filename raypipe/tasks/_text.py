"""What the sequence-level tasks (one prediction per text or text pair) have in common.

Composition, not inheritance: each task module calls these functions for its inputs, its
tokenisation and its forward pass, and keeps its own targets, head, metrics and answers.

Inputs are one text per example (``data.text_columns``, joined) or a pair of texts when
``data.text_pair_column`` is set. A pair is tokenised as a pair (``tokenizer(a, b)``, truncation
``longest_first``), so the model sees ``[CLS] a [SEP] b [SEP]`` with segment ids, not one string
glued with a separator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from raypipe.errors import DataError

TEXT, PAIR, LABEL = "text", "text_pair", "label"


# --------------------------------------------------------------------------- inputs


def needed_columns(cfg: Any) -> list[str]:
    return [*cfg.text_columns, *([cfg.text_pair_column] if cfg.text_pair_column else [])]


def missing_columns(raw: Any, where: str, cols: list[str]) -> None:
    missing = [c for c in cols if c not in raw.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; it has {[str(c) for c in raw.columns]} "
            "(set data.text_columns / data.text_pair_column / data.label_column, or data.columns "
            "for a file without a header)"
        )
    if raw.empty:
        raise DataError(f"{where}: no rows")


def _text_column(raw: Any, col: str, where: str) -> Any:
    values = raw[col]
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) and v is not None]
    if bad:
        raise DataError.at(where, bad, f"non-text value in column '{col}' ({values.iloc[bad[0]]!r})")
    return values.fillna("").astype(str).str.strip()


def text_inputs(raw: Any, where: str, cfg: Any) -> dict[str, Any]:
    """``{"text": Series[, "text_pair": Series]}``, every value a non-empty string."""
    parts = [_text_column(raw, col, where) for col in cfg.text_columns]
    text = parts[0]
    for extra in parts[1:]:
        text = (text + cfg.text_separator + extra).str.strip()
    empty = [i for i, t in enumerate(text) if not t]
    if empty:
        raise DataError.at(where, empty, f"empty text in {'+'.join(cfg.text_columns)}")
    out = {TEXT: text.reset_index(drop=True)}
    if cfg.text_pair_column:
        pair = _text_column(raw, cfg.text_pair_column, where)
        empty = [i for i, t in enumerate(pair) if not t]
        if empty:
            raise DataError.at(where, empty, f"empty second text in pair column '{cfg.text_pair_column}'")
        out[PAIR] = pair.reset_index(drop=True)
    return out


def input_schema(train: Any) -> dict[str, Any]:
    return {"inputs": "pair" if PAIR in train.columns else "text"}


def is_pair(schema: Mapping[str, Any]) -> bool:
    return schema.get("inputs") == "pair"


def inputs_of(frame: Any) -> list[Any]:
    """Texts, or ``(a, b)`` pairs when the examples have a second text."""
    if PAIR in frame.columns:
        return list(zip(frame[TEXT], frame[PAIR]))
    return list(frame[TEXT])


def check_inputs(inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]:
    """Texts (``str``) for a text model, ``(a, b)`` pairs for a pair model; what is wrong otherwise."""
    if isinstance(inputs, str):
        raise DataError("pass a list of texts, not a single string")
    pair = is_pair(schema)
    out: list[Any] = []
    for i, item in enumerate(inputs):
        if pair:
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                raise DataError(f"input {i}: this model compares two texts; pass [text_a, text_b] pairs")
            a, b = item
            for side, t in (("first", a), ("second", b)):
                if not isinstance(t, str):
                    raise DataError(f"input {i}: the {side} text is {type(t).__name__}, expected a string")
                if not t.strip():
                    raise DataError(f"input {i}: the {side} text is empty or whitespace only")
            out.append((a, b))
        else:
            if not isinstance(item, str):
                hint = " (this model takes single texts, not pairs)" if isinstance(item, (list, tuple)) else ""
                raise DataError(f"text {i} is {type(item).__name__}, expected a string{hint}")
            if not item.strip():
                raise DataError(f"text {i} is empty or whitespace only")
            out.append(item)
    if not out:
        raise DataError("no texts given")
    return out


# --------------------------------------------------------------------------- labels


def is_label(v: Any) -> bool:
    """A usable class label: a non-blank string or an integer (also an integral float)."""
    if isinstance(v, bool) or v is None:
        return False
    if isinstance(v, str):
        return bool(v.strip())
    if isinstance(v, int) or type(v).__name__.startswith("int"):
        return True
    if isinstance(v, float) or type(v).__name__.startswith("float"):
        return float(v) == float(v) and float(v).is_integer()  # NaN or 1.5 is no class
    return False


def label_str(v: Any) -> str:
    return v.strip() if isinstance(v, str) else str(int(v))


def sort_labels(labels: set[str]) -> list[str]:
    """Integer-like labels in numeric order, others alphabetically."""
    # ASCII digits only: str.isdigit() is also true for "²", which int() refuses, and "--1"
    # passes lstrip("-").isdigit() too.
    if all(re.fullmatch("-?[0-9]+", lbl) for lbl in labels):
        return sorted(labels, key=int)
    return sorted(labels)


@lru_cache(maxsize=16)
def _names_file(path: str) -> tuple[str, ...]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.label_names: file '{path}' not found (give a list of names or a file, one per line)")
    names = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DataError(f"data.label_names: '{path}' holds no names")
    return names


def label_names(cfg: Any) -> tuple[str, ...] | None:
    """``data.label_names`` as a tuple (read from the file when it is a path), or None."""
    names = cfg.label_names
    if names is None:
        return None
    if isinstance(names, str):
        return _names_file(names)
    return tuple(str(n) for n in names)


def name_label(v: Any, names: tuple[str, ...] | None) -> str | None:
    """The label for one raw value: itself as a string, or the name at that index when
    ``data.label_names`` is set (None when the value is not a valid index)."""
    text = label_str(v)
    if names is None:
        return text
    if not re.fullmatch("[0-9]+", text) or int(text) >= len(names):
        return None
    return names[int(text)]


def ordered_labels(seen: set[str], names: tuple[str, ...] | None) -> list[str]:
    """The label list of a model: every name of ``data.label_names`` in id order (the label set is
    declared, so a label that a subsample of the training data lacks still has an output and
    ids keep their meaning), else the labels the training split has, sorted."""
    if names is None:
        return sort_labels(seen)
    return list(dict.fromkeys(names))


def unseen_error(frame_labels: Any, known: set[str], role: str, where: str, labels: list[str]) -> None:
    """A validation/test label the training split never had is an error (the model has no
    output for it): name the row (or, evaluating a trained model, every unknown label)."""
    rows = [i for i, ls in enumerate(frame_labels) if not set(ls) <= known]
    if not rows:
        return
    if role == "evaluation":
        unknown = sorted({x for ls in frame_labels for x in ls} - known)
        raise DataError(
            f"{where}: label(s) {unknown} are not known to the model, which predicts {labels}. "
            "Evaluate on data labelled with the model's classes (check data.label_column)."
        )
    bad = sorted(set(frame_labels[rows[0]]) - known)[0]
    raise DataError.at(where, rows, f"{role} label {bad!r} never occurs in the training data")


# --------------------------------------------------------------------------- tokens


def encode_inputs(tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]:
    """input_ids / attention_mask (+ token_type_ids for pairs) padded to ``max_length``, and each
    row's real length (the loop trims every batch to its longest row)."""
    import numpy as np

    texts = list(frame[TEXT])
    pair = is_pair(schema)
    if not texts:  # the same arrays with no rows (an empty split still has a schema)
        width = np.zeros((0, max_length), dtype=np.int32)
        empty = {"input_ids": width, "attention_mask": width, "length": np.zeros(0, np.int32)}
        return {**empty, "token_type_ids": width} if pair and "token_type_ids" in tokenizer.model_input_names else empty
    enc = tokenizer(
        texts,
        list(frame[PAIR]) if pair else None,
        truncation="longest_first" if pair else True,
        max_length=max_length,
        padding="max_length",
        return_tensors="np",
    )
    mask = enc["attention_mask"].astype(np.int32)
    out = {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": mask,
        "length": mask.sum(axis=1).astype(np.int32),
    }
    if pair and "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"].astype(np.int32)
    return out


INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def forward_logits(model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                   max_length: int, batch_size: int) -> Any:
    """The model's logits for every input, in input order, as float32 numpy.

    Inputs are sorted by length first so each batch pads only to its own longest text.
    """
    import numpy as np
    import torch

    pair = is_pair(schema)
    size = (lambda i: len(inputs[i][0]) + len(inputs[i][1])) if pair else (lambda i: len(inputs[i]))
    order = sorted(range(len(inputs)), key=size)
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            first = [inputs[i][0] if pair else inputs[i] for i in idx]
            second = [inputs[i][1] for i in idx] if pair else None
            enc = tokenizer(
                first, second,
                truncation="longest_first" if pair else True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            logits = model(**enc).logits.float().cpu().numpy()
            if out is None:
                out = np.empty((len(inputs), *logits.shape[1:]), dtype=np.float32)
            out[idx] = logits
    assert out is not None  # check_inputs refuses an empty list
    return out


def label_head(schema: Mapping[str, Any], problem_type: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs of a head with one output per label of the schema."""
    labels = list(schema["labels"])
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": problem_type,
    }
