"""Token classification (named entities): one tag per word; answers are character spans.

Data
    Examples are sentences as word lists with one tag per word: CoNLL column files (``data.format:
    conll``; a token per line, the tag in ``data.conll_tag_column``, a blank line between
    sentences, ``-DOCSTART-`` lines skipped) or JSON/JSONL/Parquet/``datasets`` rows with a word
    list column (``data.tokens_column``, default ``tokens``) and a tag list column
    (``data.label_column`` when set, else ``tags`` or ``ner_tags``; integer tags are named by
    ``data.label_names`` or the dataset's ClassLabel names). Tags are ``O`` or ``<prefix>-<TYPE>``.
    ``data.tag_scheme`` (auto: IOBES when an ``E-``/``S-`` tag occurs, IOB1 when an ``I-`` tag
    starts an entity, else IOB2) is checked per sentence; IOB1 is converted to IOB2 on reading.
    The tag set comes from the training split; a validation/test tag it lacks is an error.

Encoding (recorded in the checkpoint's schema)
    Words are tokenised with ``is_split_into_words``. A word's tag goes on its *first* sub-token;
    the others get -100, which the loss ignores (``subword_labels: first``). A word the tokenizer
    turns into nothing (a zero-width space) is fed as the unknown token, so every word gets a
    prediction. A sentence longer than ``max_length`` is not truncated: it is cut into windows of
    sub-tokens that overlap by ``window_stride``, and each word is labelled -- and predicted --
    only in the window where its first sub-token has the most context on both sides (the longest
    distance to the window's nearer edge). Each word is therefore scored exactly once, and a
    sentence's windows stitch back to one tag per word, even when they land on different Ray
    Train workers (the accumulator sorts words by sentence id and word index after gathering).

Metrics
    Entity-level precision/recall/F1 (micro over all types, and per type) as ``seqeval`` computes
    them in strict mode for the schema's scheme (an entity counts only if its type and both
    boundaries match), and word-level tag accuracy. ``val_entity_f1`` is the default for early
    stopping, ASHA and the promotion gate. The report adds a confusion matrix over entity types
    (word level, ``O`` included).

Prediction
    Inputs are raw texts or pre-split word lists. A text is split into words by :data:`WORD_RE`
    (runs of letters/digits, joined by inner ``- ' . & /``, and every other non-space character
    on its own), which keeps each word's character offsets; a word list is joined with single
    spaces and offsets refer to that string. Spans are merged from word tags leniently: an entity
    starts at ``B-X``/``S-X`` or at an ``I-X``/``E-X`` that does not continue an entity of type X,
    continues over ``I-X``/``E-X``, and ends after ``E-X``/``S-X`` or before anything else.
    ``score`` is the mean probability of the span's word tags; ``text`` is ``input[start:end]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from raypipe.errors import DataError
from raypipe.tasks import Scores, _text

TOKENS, LABEL = "tokens", "label"
LINE = "_line"  # the first line of a sentence in a CoNLL file (for error messages)
IGNORE = -100  # labels the loss skips (sub-tokens after a word's first)
WORD_RE = re.compile(r"(?:[^\W\d_]\.){2,}|\w+(?:[-'’.&/]\w+)*|[^\w\s]")
SCHEMES = {"iob2": "IOB2", "iob1": "IOB1", "iobes": "IOBES"}


class Entity(BaseModel):
    type: str = Field(description="Entity type, e.g. PER, LOC, ORG.")
    text: str = Field(description="The entity as it appears in the input: input[start:end].")
    start: int = Field(description="Character offset of the first character (0-based).")
    end: int = Field(description="Character offset after the last character.")
    score: float = Field(description="Mean probability of the span's word tags.")


class TokenPrediction(BaseModel):
    entities: list[Entity] = Field(description="Entities in input order.")
    words: list[str] = Field(description="The words the text was split into (or the words given).")
    tags: list[str] = Field(description="One tag per word.")


# --------------------------------------------------------------------------- tag schemes


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", None)``; anything else raises ValueError."""
    if tag == "O":
        return "O", None
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag {tag!r} is neither 'O' nor <B|I|E|S>-<TYPE>")
    return prefix, kind


def detect_scheme(sentences: Sequence[Sequence[str]]) -> str:
    """IOBES when any E-/S- tag occurs, IOB1 when an I- tag starts an entity, else IOB2."""
    iob1 = False
    for tags in sentences:
        prev: tuple[str, str | None] = ("O", None)
        for tag in tags:
            p, k = split_tag(tag)
            if p in ("E", "S"):
                return "IOBES"
            if p == "I" and (prev[0] == "O" or prev[1] != k):
                iob1 = True
            prev = (p, k)
    return "IOB1" if iob1 else "IOB2"


def scheme_problem(tags: Sequence[str], scheme: str) -> str | None:
    """What breaks ``scheme`` in one sentence's tags (None when they are valid)."""
    prev: tuple[str, str | None] = ("O", None)
    for i, tag in enumerate(tags):
        p, k = split_tag(tag)
        open_entity = prev[0] in ("B", "I")
        if scheme == "IOB2" and p == "I" and not (prev[0] in ("B", "I") and prev[1] == k):
            return f"word {i + 1}: {tag!r} does not continue a {k} entity (IOB2 starts every entity with B-)"
        if scheme == "IOB1" and p in ("E", "S"):
            return f"word {i + 1}: {tag!r} is not an IOB1 tag"
        if scheme == "IOB2" and p in ("E", "S"):
            return f"word {i + 1}: {tag!r} is not an IOB2 tag (set data.tag_scheme: iobes)"
        if scheme == "IOBES":
            if p in ("I", "E") and not (open_entity and prev[1] == k):
                return f"word {i + 1}: {tag!r} does not continue a {k} entity"
            if p in ("B", "S", "O") and open_entity:
                return f"word {i + 1}: the {prev[1]} entity before {tag!r} has no E- tag"
        prev = (p, k)
    if scheme == "IOBES" and prev[0] in ("B", "I"):
        return f"the {prev[1]} entity at the end has no E- tag"
    return None


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """An I-X that starts an entity becomes B-X (valid IOB2 passes unchanged)."""
    out, prev = [], ("O", None)
    for tag in tags:
        p, k = split_tag(tag)
        if p == "I" and (prev[0] == "O" or prev[1] != k):
            tag = f"B-{k}"
        out.append(tag)
        prev = (p, k)
    return out


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity, merged leniently (module docstring)."""
    out: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate(tags):
        try:
            p, k = split_tag(tag)
        except ValueError:
            p, k = "O", None
        if p == "O" or p in ("B", "S") or k != kind:
            if kind is not None:
                out.append((kind, start, i))
            kind, start = (k, i) if p != "O" else (None, i)
        if p in ("E", "S") and kind is not None:
            out.append((kind, start, i + 1))
            kind = None
    if kind is not None:
        out.append((kind, start, len(tags)))
    return out


def entity_types(labels: Sequence[str]) -> list[str]:
    return sorted({k for t in labels if (k := split_tag(t)[1]) is not None})


# --------------------------------------------------------------------------- words -> windows


def words_of(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """A raw text's words and their character offsets (:data:`WORD_RE`)."""
    found = list(WORD_RE.finditer(text))
    return [m.group() for m in found], [m.span() for m in found]


def _special(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one sequence ([CLS] / [SEP] for BERT)."""
    enc = tokenizer([["x"]], is_split_into_words=True)
    ids, wids = enc["input_ids"][0], enc.word_ids(0)
    first = wids.index(0)
    last = len(wids) - 1 - wids[::-1].index(0)
    return list(ids[:first]), list(ids[last + 1 :])


def windows(tokenizer: Any, sentences: Sequence[Sequence[str]], max_length: int, stride: int) -> list[dict[str, Any]]:
    """Every sentence as windows of at most ``max_length`` ids (special tokens included).

    Each window: ``sentence`` (position in ``sentences``), ``ids``, and ``owned``: (position in
    ``ids``, word index) of the words this window is responsible for (see module docstring).
    """
    prefix, suffix = _special(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    if room < 2:
        raise DataError(f"data.max_length {max_length} leaves no room for words between the special tokens")
    overlap = max(0, min(stride, room // 2))
    unk = tokenizer.unk_token or "[UNK]"
    sents = [list(s) for s in sentences]
    enc = tokenizer(sents, is_split_into_words=True, add_special_tokens=False) if sents else None
    out: list[dict[str, Any]] = []
    for s, words in enumerate(sents):
        ids, wids = list(enc["input_ids"][s]), enc.word_ids(s)
        if len(set(w for w in wids if w is not None)) < len(words):  # words that tokenise to nothing
            present = set(wids)
            fixed = [w if i in present else unk for i, w in enumerate(words)]
            one = tokenizer([fixed], is_split_into_words=True, add_special_tokens=False)
            ids, wids = list(one["input_ids"][0]), one.word_ids(0)
        first: dict[int, int] = {}
        for pos, w in enumerate(wids):
            if w is not None and w not in first:
                first[w] = pos
        n = len(ids)
        bounds, start = [], 0
        while True:
            end = min(start + room, n)
            bounds.append((start, end))
            if end >= n:
                break
            start = end - overlap  # overlap <= room // 2, so every window moves on
        owner: dict[int, list[tuple[int, int]]] = {}
        for w, pos in first.items():
            best = max(range(len(bounds)), key=lambda b: (min(pos - bounds[b][0], bounds[b][1] - 1 - pos)
                                                          if bounds[b][0] <= pos < bounds[b][1] else -1))
            owner.setdefault(best, []).append((pos - bounds[best][0] + len(prefix), w))
        for b, (a, z) in enumerate(bounds):
            if b in owner:  # a window that owns no word adds nothing (and all -100 labels make a NaN loss)
                out.append({"sentence": s, "ids": prefix + ids[a:z] + suffix, "owned": sorted(owner[b])})
    return out


def _pad(wins: list[dict[str, Any]], width: int, pad_id: int, tags: Sequence[Sequence[int]] | None,
         sentence_ids: Sequence[int]) -> dict[str, Any]:
    import numpy as np

    n = len(wins)
    ids = np.full((n, width), pad_id, dtype=np.int32)
    mask = np.zeros((n, width), dtype=np.int32)
    word = np.full((n, width), -1, dtype=np.int32)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    for r, win in enumerate(wins):
        k = len(win["ids"])
        ids[r, :k] = win["ids"]
        mask[r, :k] = 1
        for pos, w in win["owned"]:
            word[r, pos] = w
            if tags is not None:
                labels[r, pos] = tags[win["sentence"]][w]
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "length": mask.sum(axis=1).astype(np.int32),
        "word": word,
        "sentence": np.asarray([sentence_ids[w["sentence"]] for w in wins], dtype=np.int64),
    }
    if tags is not None:
        out["labels"] = labels
    return out


# --------------------------------------------------------------------------- metrics


class EntityAccumulator:
    """Word-level predictions of owned positions; stitched per sentence and scored on ``compute``."""

    def __init__(self, labels: list[str], scheme: str):
        self.labels, self.scheme = labels, scheme
        self.parts: list[tuple[Any, Any, Any, Any]] = []

    def update(self, logits: Any, rows: Mapping[str, Any]) -> None:
        import numpy as np

        width = logits.shape[1]
        word = rows["word"][:, :width]
        owned = word >= 0
        pred = logits.argmax(dim=-1).cpu().numpy()
        sentence = np.broadcast_to(rows["sentence"][:, None], word.shape)
        self.parts.append((sentence[owned], word[owned], rows["labels"][:, :width][owned], pred[owned]))

    def compute(self, loss: float, gather: Any) -> Scores:
        import numpy as np

        cols = [gather(np.concatenate([p[i] for p in self.parts]) if self.parts else np.zeros(0, np.int64))
                for i in range(4)]
        sentence, word, true, pred = (np.asarray(c, dtype=np.int64) for c in cols)
        order = np.lexsort((word, sentence))
        sentence, true, pred = sentence[order], true[order], pred[order]
        cuts = np.flatnonzero(np.diff(sentence)) + 1
        names = np.asarray(self.labels, dtype=object)
        y_true = [list(names[t]) for t in np.split(true, cuts)] if len(true) else []
        y_pred = [list(names[p]) for p in np.split(pred, cuts)] if len(pred) else []
        return score_tags(y_true, y_pred, self.labels, self.scheme, loss)


def score_tags(y_true: list[list[str]], y_pred: list[list[str]], labels: list[str], scheme: str,
               loss: float = float("nan")) -> Scores:
    """seqeval's strict entity metrics, word accuracy and the type confusion matrix."""
    import numpy as np

    types = entity_types(labels)
    words = sum(len(t) for t in y_true)
    correct = sum(a == b for t, p in zip(y_true, y_pred) for a, b in zip(t, p))
    per_type = {k: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for k in types}
    micro = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    if words:
        from seqeval import scheme as seqeval_scheme
        from seqeval.metrics import classification_report

        report = classification_report(y_true, y_pred, mode="strict", output_dict=True, zero_division=0,
                                       scheme=getattr(seqeval_scheme, scheme))
        for k, row in report.items():
            if k in per_type:
                per_type[k] = {"precision": float(row["precision"]), "recall": float(row["recall"]),
                               "f1": float(row["f1-score"]), "support": int(row["support"])}
        if "micro avg" in report:
            micro = {m: float(report["micro avg"][s]) for m, s in
                     (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))}
    axis = ["O", *types]
    index = {k: i for i, k in enumerate(axis)}
    cm = np.zeros((len(axis), len(axis)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        for a, b in zip(t, p):
            cm[index[split_tag(a)[1] or "O"], index[split_tag(b)[1] or "O"]] += 1
    return Scores(
        metrics={
            "loss": loss,
            "entity_f1": micro["f1"],
            "entity_precision": micro["precision"],
            "entity_recall": micro["recall"],
            "token_accuracy": correct / words if words else 0.0,
        },
        details={"per_type": per_type, "confusion": cm.tolist(), "types": axis, "words": words,
                 "sentences": len(y_true)},
    )


# --------------------------------------------------------------------------- the task


class TokenClassificationTask:
    name = "token_classification"
    metrics = {"loss": "min", "entity_f1": "max", "entity_precision": "max", "entity_recall": "max",
               "token_accuracy": "max"}
    default_metric = "entity_f1"
    model_class = "AutoModelForTokenClassification"
    long_inputs = "windows"  # a sentence longer than max_length is split, never truncated (batch checks)
    schema_keys = ("labels", "scheme")
    input_keys = ("input_ids", "attention_mask", "labels")
    sequence_keys = ("input_ids", "attention_mask", "labels")
    prediction_model = TokenPrediction
    text_file_format = "conll"  # how a plain .txt training file is read for this task

    # --- data ---------------------------------------------------------------------------

    def _tag_column(self, raw: Any, cfg: Any) -> str:
        if "label_column" in cfg.model_fields_set:
            return cfg.label_column
        return next((c for c in ("tags", "ner_tags", cfg.label_column) if c in raw.columns), "tags")

    def examples(self, raw: Any, where: str, cfg: Any) -> Any:
        import pandas as pd

        tag_col = self._tag_column(raw, cfg)
        missing = [c for c in (cfg.tokens_column, tag_col) if c not in raw.columns]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing}; it has {[str(c) for c in raw.columns]} "
                            "(set data.tokens_column / data.label_column, or read a CoNLL file with data.format: conll)")
        if raw.empty:
            raise DataError(f"{where}: no sentences")
        lines = list(raw[LINE]) if LINE in raw.columns else None

        def fail(rows: list[int], what: str) -> DataError:
            if lines is None:
                return DataError.at(where, rows, what)
            more = f" (and {len(rows) - 1} more sentence(s))" if len(rows) > 1 else ""
            return DataError(f"{where}: line {lines[rows[0]]}: {what}{more}")

        names = _text.label_names(cfg)
        tokens_out, tags_out, bad = [], [], {}
        for i, (toks, tags) in enumerate(zip(raw[cfg.tokens_column], raw[tag_col])):
            toks, tags = _as_list(toks), _as_list(tags)
            if toks is None:
                bad.setdefault(f"'{cfg.tokens_column}' is not a list of words", []).append(i)
                continue
            if tags is None:
                bad.setdefault(f"'{tag_col}' is not a list of tags", []).append(i)
                continue
            if not toks:
                bad.setdefault("empty sentence (no words)", []).append(i)
                continue
            if len(toks) != len(tags):
                bad.setdefault(f"{len(toks)} words but {len(tags)} tags", []).append(i)
                continue
            if any(not isinstance(t, str) or not t.strip() for t in toks):
                bad.setdefault("a word is empty, whitespace or not a string", []).append(i)
                continue
            named = [_tag_name(t, names) for t in tags]
            if any(t is None for t in named):
                first = next(t for t, n in zip(tags, named) if n is None)
                hint = ("an index into data.label_names" if names else
                        "a tag string (integer tag ids need data.label_names)")
                bad.setdefault(f"tag {first!r} is not {hint}", []).append(i)
                continue
            try:
                for t in named:
                    split_tag(t)
            except ValueError as exc:
                bad.setdefault(str(exc), []).append(i)
                continue
            tokens_out.append([t.strip() for t in toks])
            tags_out.append(named)
        if bad:
            what, rows = min(bad.items(), key=lambda kv: kv[1][0])
            raise fail(rows, what)
        scheme = SCHEMES.get(cfg.tag_scheme) or detect_scheme(tags_out)
        for i, tags in enumerate(tags_out):
            problem = scheme_problem(tags, scheme)
            if problem:
                hint = "" if cfg.tag_scheme != "auto" else f" (read as {scheme}; set data.tag_scheme)"
                raise fail([i], f"{problem}{hint}")
        if scheme == "IOB1":
            tags_out = [iob1_to_iob2(t) for t in tags_out]
        return pd.DataFrame({TOKENS: tokens_out, LABEL: tags_out})

    def schema(self, train: Any, cfg: Any) -> dict[str, Any]:
        seen = {t for tags in train[LABEL] for t in tags}
        names = _text.label_names(cfg)
        labels = (list(dict.fromkeys(names)) if names is not None
                  else ["O", *sorted(seen - {"O"}, key=lambda t: (split_tag(t)[1], "BIES".index(split_tag(t)[0])))])
        if not entity_types(labels):
            raise DataError(f"{cfg.path}: the training data has no entity tags (every word is 'O')")
        if len(train) and cfg.window_stride >= cfg.max_length - 2:
            raise DataError(f"data.window_stride {cfg.window_stride} must be smaller than data.max_length {cfg.max_length}")
        scheme = "IOBES" if any(split_tag(t)[0] in ("E", "S") for t in labels) else "IOB2"
        return {"labels": labels, "scheme": scheme, "subword_labels": "first", "stride": cfg.window_stride,
                "words": WORD_RE.pattern, "inputs": "tokens"}

    def check(self, frame: Any, schema: Mapping[str, Any], role: str, where: str) -> None:
        _text.unseen_error(list(frame[LABEL]), set(schema["labels"]), role, where, list(schema["labels"]))

    def stratify_key(self, frame: Any) -> Any:
        """The sentence's first entity type ('O' without entities): spreads types over the splits."""
        import pandas as pd

        return pd.Series([next((k for t in tags if (k := split_tag(t)[1])), "O") for tags in frame[LABEL]],
                         index=frame.index)

    def encode(self, tokenizer: Any, frame: Any, schema: Mapping[str, Any], max_length: int) -> dict[str, Any]:
        index = {t: i for i, t in enumerate(schema["labels"])}
        sentences = [list(s) for s in frame[TOKENS]]
        tags = [[index[t] for t in tags] for tags in frame[LABEL]]
        ids = list(frame["_example"]) if "_example" in frame.columns else list(frame.index)
        wins = windows(tokenizer, sentences, max_length, int(schema.get("stride", 0)))
        return _pad(wins, max_length, tokenizer.pad_token_id or 0, tags, ids)

    def inputs_of(self, frame: Any) -> list[Any]:
        return [list(s) for s in frame[TOKENS]]

    # --- model and metrics --------------------------------------------------------------

    def model_kwargs(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        kw = _text.label_head(schema, "single_label_classification")
        kw.pop("problem_type")  # a token head has one loss
        return kw

    def accumulator(self, schema: Mapping[str, Any], *, fit: bool) -> EntityAccumulator:
        return EntityAccumulator(list(schema["labels"]), str(schema["scheme"]))

    # --- prediction ---------------------------------------------------------------------

    def check_inputs(self, inputs: Sequence[Any], schema: Mapping[str, Any]) -> list[Any]:
        """Texts (``str``) or word lists (``list[str]``), each non-empty."""
        if isinstance(inputs, str):
            raise DataError("pass a list of texts (or of word lists), not a single string")
        out: list[Any] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if not item.strip():
                    raise DataError(f"text {i} is empty or whitespace only")
                out.append(item)
                continue
            words = _as_list(item)
            if words is None:
                raise DataError(f"input {i} is {type(item).__name__}; pass a text or a list of words")
            if not words:
                raise DataError(f"input {i}: the word list is empty")
            for j, w in enumerate(words):
                if not isinstance(w, str) or not w.strip():
                    raise DataError(f"input {i}: word {j} is empty, whitespace or not a string")
            out.append([w.strip() for w in words])
        if not out:
            raise DataError("no texts given")
        return out

    def predict(self, model: Any, tokenizer: Any, inputs: Sequence[Any], schema: Mapping[str, Any], *,
                max_length: int, batch_size: int, **_: Any) -> list[dict[str, Any]]:
        import numpy as np
        import torch

        texts, words, offsets = [], [], []
        for item in inputs:
            if isinstance(item, str):
                w, off = words_of(item)
                texts.append(item)
            else:
                w, off, pos = list(item), [], 0
                for word in w:
                    off.append((pos, pos + len(word)))
                    pos += len(word) + 1
                texts.append(" ".join(w))
            words.append(w)
            offsets.append(off)
        labels = list(schema["labels"])
        wins = windows(tokenizer, words, max_length, int(schema.get("stride", 0)))
        probs = [np.zeros((len(w), len(labels)), dtype=np.float32) for w in words]
        device = next(model.parameters()).device
        order = sorted(range(len(wins)), key=lambda i: len(wins[i]["ids"]))
        pad = tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [wins[i] for i in order[start : start + batch_size]]
                rows = _pad(batch, max(len(w["ids"]) for w in batch), pad, None, list(range(len(words))))
                logits = model(input_ids=torch.from_numpy(rows["input_ids"].astype(np.int64)).to(device),
                               attention_mask=torch.from_numpy(rows["attention_mask"].astype(np.int64)).to(device)).logits
                p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
                for r, win in enumerate(batch):
                    for pos, w in win["owned"]:
                        probs[win["sentence"]][w] = p[r, pos]
        out = []
        for text, w, off, pr in zip(texts, words, offsets, probs):
            best = pr.argmax(axis=1) if len(w) else np.zeros(0, np.int64)
            tags = [labels[j] for j in best]
            entities = []
            for kind, a, b in spans(tags):
                start, end = off[a][0], off[b - 1][1]
                entities.append({"type": kind, "text": text[start:end], "start": start, "end": end,
                                 "score": float(np.mean([pr[i, best[i]] for i in range(a, b)]))})
            out.append({"entities": entities, "words": w, "tags": tags})
        return out

    # --- people -------------------------------------------------------------------------

    def report(self, scores: Scores, schema: Mapping[str, Any]) -> list[str]:
        per_type, m = scores.details["per_type"], scores.metrics
        width = max(5, *(len(k) for k in per_type)) if per_type else 5
        lines = [f"  {'type':<{width}}  precision  recall  f1      support"]
        for k, row in per_type.items():
            lines.append(f"  {k:<{width}}  {row['precision']:<9.4f}  {row['recall']:<6.4f}  {row['f1']:<6.4f}  "
                         f"{row['support']:>7d}")
        lines.append(f"  {'micro':<{width}}  {m['entity_precision']:<9.4f}  {m['entity_recall']:<6.4f}  "
                     f"{m['entity_f1']:<6.4f}  {sum(r['support'] for r in per_type.values()):>7d}")
        lines += [f"  word accuracy {m['token_accuracy']:.4f} over {scores.details['words']} words in "
                  f"{scores.details['sentences']} sentences (entities: seqeval strict, {schema['scheme']})",
                  "", "  entity types per word (rows: true, columns: predicted)"]
        axis, cm = scores.details["types"], scores.details["confusion"]
        cell = max(len(str(max((max(r) for r in cm), default=0))), *(len(a) for a in axis))
        lines.append(f"  {'':<{width}}  " + " ".join(f"{a:>{cell}}" for a in axis))
        for a, row in zip(axis, cm):
            lines.append(f"  {a:<{width}}  " + " ".join(f"{n:>{cell}d}" for n in row))
        return lines

    def figures(self, scores: Scores, schema: Mapping[str, Any], title: str) -> dict[str, Any]:
        from raypipe.plots import confusion_matrix, per_label_bars

        return {
            "confusion_matrix.png": confusion_matrix(scores.details["confusion"], scores.details["types"],
                                                     title=f"Entity types per word: {title}"),
            "per_type_f1.png": per_label_bars(scores.details["per_type"], title=f"Entity F1 per type: {title}"),
        }

    def describe(self, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
        ents = prediction["entities"]
        if not ents:
            return "no entities"
        return ", ".join(f"{e['type']} {e['text']!r}" for e in ents[:6]) + (" ..." if len(ents) > 6 else "")

    def judge(self, target: Any, prediction: Mapping[str, Any], schema: Mapping[str, Any]) -> tuple[str, bool]:
        tags = list(target)
        words = prediction["words"]
        want = [(k, " ".join(words[a:b])) for k, a, b in spans(tags)] if len(words) == len(tags) else []
        got = [(k, " ".join(words[a:b])) for k, a, b in spans(prediction["tags"])]
        shown = ", ".join(f"{k} {t!r}" for k, t in want[:6]) or "no entities"
        return shown, want == got


def _as_list(v: Any) -> list[Any] | None:
    """A list/tuple/array of values as a list (None for anything else, e.g. a string)."""
    if isinstance(v, (list, tuple)):
        return list(v)
    if type(v).__name__ == "ndarray":
        return list(v.tolist())
    return None


def _tag_name(v: Any, names: tuple[str, ...] | None) -> str | None:
    """A tag as given (a string), or the name of an integer tag id in ``data.label_names``."""
    if isinstance(v, str):
        return v.strip() or None
    if names is None or not _text.is_label(v):
        return None
    return _text.name_label(v, names)
