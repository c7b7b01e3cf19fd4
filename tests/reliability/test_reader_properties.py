"""Malformed data files, generated: the readers load well-formed splits or say what is wrong.

hypothesis writes files of every format ``raypipe.data`` reads (CSV, TSV, JSON, JSONL, Parquet,
folder per class): random bytes, valid files cut off at a random byte, valid files with invalid
UTF-8 / NULs / quotes / newlines spliced in, missing or misnamed text and label columns, empty and
whitespace texts, labels that are null, bools, floats, lists or nested objects, lone surrogate
escapes in JSON, JSON nested deeper than the parser's recursion limit, a single class, too few rows
for a validation split, undecodable folder names, duplicate Parquet columns. Each file goes through
the public entry point ``raypipe.data.load_splits`` with a generated (valid) data config.

Property, per file: either the result is well formed (three frames of stripped, non-empty,
UTF-8-encodable text and label strings; at least two classes; every validation/test label seen in
training; a non-empty validation split; a sha256 fingerprint) or a ``DataError``/``ConfigError`` is
raised whose message names the file. Any other exception (KeyError, UnicodeDecodeError, pandas'
ParserError, RecursionError, ValueError...) escapes and fails the test with the shrunk file.

A second property feeds well-formed files with arbitrary Unicode text and labels (every format)
and checks that every row comes back as written (stripped), so the readers do not just reject.
The inputs that broke the readers when this file was written are also tried by hand every run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from raypipe.config import config_from_dict
from raypipe.data import load_splits
from raypipe.errors import ConfigError, DataError

MAX_EXAMPLES = 150  # malformed files per format; the whole file takes about 10 s on 2 cores
ROUND_TRIP_EXAMPLES = 40  # well-formed files per format
FORMATS = ["csv", "tsv", "json", "jsonl", "parquet", "folder"]
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written to .hypothesis/ in the repo
    derandomize=True,  # the same files every run: a CI failure reproduces locally
    suppress_health_check=list(HealthCheck),
    phases=[Phase.generate, Phase.shrink],  # no explain phase: `shown` below names the failing input
)
STATS: dict[str, Counter] = {}
REASONS: Counter = Counter()  # rejections by what the message says is wrong
T0: list[float] = []


# ----------------------------------------------------------------------------- checking


def _count(fmt: str, outcome: str) -> None:
    if not T0:
        T0.append(time.perf_counter())
    STATS.setdefault(fmt, Counter())[outcome] += 1


_REASONS = [
    "nested too deeply", "surrogate", "not valid UTF-8", "folder name", "cannot parse", "not valid JSON",
    "cannot read as Parquet", "expected a list", "expected an object", "missing column", "no rows",
    "non-text value", "empty text", "label in column", "never occurs in the training data", "need at least 2",
    "validation split is empty", "no text files", "cannot tell the format",
]


def _reason(msg: str) -> str:
    return next((r for r in _REASONS if r in msg), "other")


def assert_well_formed(splits, expected_rows: int | None = None) -> None:
    frames = {"train": splits.train, "val": splits.val, "test": splits.test}
    for name, frame in frames.items():
        assert list(frame.columns) == ["text", "label"], (name, list(frame.columns))
        for text in frame["text"]:
            assert isinstance(text, str) and text and text == text.strip(), (name, text)
            text.encode("utf-8")  # no lone surrogates: the tokenizer would raise on them later
        for label in frame["label"]:
            assert isinstance(label, str) and label.strip(), (name, label)
            label.encode("utf-8")
        assert splits.label_ids(frame).ge(0).all()  # every label maps to an id (no NaN)
    assert len(splits.labels) >= 2 and len(set(splits.labels)) == len(splits.labels), splits.labels
    assert set(splits.labels) == set(splits.train["label"])
    assert set(splits.val["label"]) | set(splits.test["label"]) <= set(splits.labels)
    assert len(splits.val) > 0
    assert re.fullmatch("[0-9a-f]{64}", splits.fingerprint)
    if expected_rows is not None:
        assert sum(len(f) for f in frames.values()) == expected_rows


def attempt(fmt: str, data_cfg: dict, *named: str) -> object | None:
    """load_splits on a generated source: well-formed Splits, or a raypipe error naming the file."""
    cfg = config_from_dict({"data": data_cfg}).data  # the config itself is always valid
    try:
        splits = load_splits(cfg)
    except (DataError, ConfigError) as exc:
        msg = str(exc)
        assert msg.strip(), f"{type(exc).__name__} with an empty message"
        assert any(p in msg for p in named), f"the message does not name {named}: {msg!r}"
        _count(fmt, f"rejected:{type(exc).__name__}")
        REASONS[_reason(msg)] += 1
        return None
    assert_well_formed(splits)
    _count(fmt, "accepted")
    return splits


@contextmanager
def shown(**inputs: object) -> Iterator[None]:
    """Name the generated input in any failure (under pytest, this hypothesis version prints the
    falsifying example's arguments blank)."""
    try:
        yield
    except BaseException as exc:
        exc.add_note("input: " + ", ".join(f"{k}={v!r:.800}" for k, v in inputs.items()))
        raise


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reader-props")


@contextmanager
def fresh_dir(scratch: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir=scratch))
    try:
        yield d
    finally:
        shutil.rmtree(d)


# ----------------------------------------------------------------------------- strategies

GOOD_TEXTS = ["the match ended late", "new chip for phones", "  soup of the day ", "goal!", "x"]
ODD_STRINGS = ["", " ", "\t\n", "\ufeff", "NaN", "null", "None", "\x00", '"', "a,b", "a\tb", "a\nb",
               "\r", "\u2028", "\x85"]
LABELS = ["sport", "tech", "food", "1", "2", "10", "-1", "²", "³", "--1", "Sport ", " ", ""]
KEYS = ["text", "label", "title", "Text", "lbl", ""]

texts = st.one_of(st.sampled_from(GOOD_TEXTS), st.sampled_from(GOOD_TEXTS), st.text(max_size=12),
                  st.sampled_from(ODD_STRINGS))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), texts,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
labels = st.one_of(st.sampled_from(LABELS), scalars)
bad_row = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), json_values, max_size=4)
# A whole file's classes: words, integer-like strings, Unicode digits, JSON numbers, a single class.
LABEL_POOLS = [["sport", "tech", "food"], ["sport", "tech"], ["sport"], ["1", "2", "10"], ["²", "³"],
               ["--1", "2"], [1, 2], [1.0, 2.0], ["-1", "0", "1"]]
# One bad cell or row: odd texts (empty, whitespace, NUL, BOM, U+2028...), non-text values, odd labels.
corruption = st.one_of(
    st.fixed_dictionaries({"text": texts | json_values}),
    st.fixed_dictionaries({"label": labels | json_values}),
    st.fixed_dictionaries({"title": texts | json_values}),
    bad_row.map(lambda r: {"__replace__": r}),
)


@st.composite
def rows(draw, extra_corruptions: st.SearchStrategy | None = None) -> list[dict]:
    """Mostly valid records (so that deep code paths are reached) with 0-3 corruptions."""
    pool = draw(st.sampled_from(LABEL_POOLS))
    good = st.fixed_dictionaries(
        {"text": st.sampled_from(GOOD_TEXTS), "label": st.sampled_from(pool)},
        optional={"title": st.sampled_from(GOOD_TEXTS)},
    )
    n = draw(st.integers(0, 40))
    records = draw(st.lists(good, min_size=n, max_size=n))
    changes = st.tuples(st.integers(0, 10**6), corruption if extra_corruptions is None else corruption | extra_corruptions)
    for pos, change in draw(st.sampled_from([0, 0, 1, 2, 3]).flatmap(lambda k: st.lists(changes, min_size=k, max_size=k))):
        if records:
            i = pos % len(records)
            records[i] = change["__replace__"] if "__replace__" in change else {**records[i], **change}
    return records


# Bytes that break encodings and tokenisers when spliced into an otherwise valid file.
NASTY = [b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b'"', b"\n", b"\r", b",", b"\t",
         b"{", b"[", b"]", b"}", b"\\", b"\\ud800", b"\xef\xbb\xbf"]
splice = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(NASTY) | st.binary(max_size=4)), max_size=3)


def mutate(data: bytes, how: str, cut: int, inserts: list[tuple[int, bytes]]) -> bytes:
    if how == "truncated":
        return data[: cut % (len(data) + 1)]
    if how == "spliced":
        for pos, chunk in inserts:
            pos %= len(data) + 1
            data = data[:pos] + chunk + data[pos:]
    return data


def mutated(serialised: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A serialised file as is, cut off at a random byte, with junk spliced in, or random bytes."""
    mutation = st.builds(mutate, serialised, st.sampled_from(["as-is"] * 3 + ["truncated", "spliced"]),
                         st.integers(0, 10**6), splice)
    return st.one_of(mutation, mutation, mutation, st.binary(max_size=300))


data_configs = st.fixed_dictionaries(
    {
        "encoding_errors": st.sampled_from(["replace", "replace", "strict"]),
        "text_columns": st.sampled_from([["text"]] * 4 + [["title", "text"]]),
        "fractions": st.sampled_from([(0.1, 0.1), (0.1, 0.1), (0.0, 0.2), (0.3, 0.0), (0.5, 0.4)]),
        "max_samples": st.sampled_from([None, None, None, 5, 30]),
    }
)


def data_cfg(path: Path, opts: dict, **extra) -> dict:
    val, test = opts["fractions"]
    return {"path": str(path), "encoding_errors": opts["encoding_errors"], "text_columns": opts["text_columns"],
            "val_fraction": val, "test_fraction": test, "max_samples": opts["max_samples"], **extra}


def _cell(v: object) -> str:
    return "" if v is None else v if isinstance(v, str) else json.dumps(v)


@st.composite
def delimited_files(draw, sep: str) -> bytes:
    records = draw(rows())
    columns = draw(st.sampled_from([None, None, None, ["text", "label"], ["label", "text", "title"], ["text"],
                                    ["lbl", "txt"]]))
    if columns is None:  # every key that occurs, in order of appearance
        columns = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.writer(out, delimiter=sep)
    writer.writerow(columns)
    for r in records:
        writer.writerow([_cell(r.get(c)) for c in columns])
    return out.getvalue().encode("utf-8", "surrogatepass")


def _dumps(doc: object, ensure_ascii: bool) -> bytes:
    # Without ensure_ascii, a lone surrogate in the text ends up as invalid (CESU-8 style) bytes.
    return json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


# Lone surrogates: json.dumps writes them as \\ud800 escapes (or as invalid bytes without ensure_ascii).
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\ud83d"])
surrogate_corruption = st.one_of(
    st.fixed_dictionaries({"text": SURROGATES}), st.fixed_dictionaries({"label": SURROGATES}),
    st.just({"\udc80": "x"}),
)


@st.composite
def json_docs(draw) -> bytes:
    kind = draw(st.sampled_from(["list", "list", "data", "any", "deep", "surrogates"]))
    if kind == "deep":  # deeper than json's recursion limit
        depth = draw(st.sampled_from([10, 5_000, 100_000]))
        return b'{"data": ' + b"[" * depth + b"]" * depth + b"}"
    records = draw(rows(surrogate_corruption if kind == "surrogates" else None))
    doc = {"list": records, "data": {"data": records}, "any": draw(json_values)}.get(kind, records)
    return _dumps(doc, draw(st.booleans()))


@st.composite
def jsonl_docs(draw) -> bytes:
    records = draw(rows(surrogate_corruption))
    lines = [_dumps(r, draw(st.booleans())) for r in records]
    if draw(st.sampled_from([False, False, False, True])):  # a line that is JSON but not an object, or nests too deep
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([b"[1, 2]", b'"text"', b"3", b"null",
                                                                            b"[" * 100_000])))
    if draw(st.booleans()):  # blank lines are allowed
        lines.insert(draw(st.integers(0, len(lines))), b"")
    return draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)


@st.composite
def parquet_files(draw) -> bytes:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 40))
    label_pool = draw(st.sampled_from([["sport"], ["sport", "tech"], ["sport", "tech"], ["a", "b", "c"]]))

    def column(kind: str):
        ints = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        if kind == "good-text":
            return pa.array(draw(st.lists(st.sampled_from(GOOD_TEXTS), min_size=n, max_size=n)), pa.string())
        if kind == "string":
            return pa.array(draw(st.lists(texts | st.none(), min_size=n, max_size=n)), pa.string())
        if kind == "labels":
            return pa.array([label_pool[i % len(label_pool)] for i in ints], pa.string())
        if kind == "dictionary":
            return pa.array([label_pool[i % len(label_pool)] for i in ints]).dictionary_encode()
        if kind == "int64":
            return pa.array(ints, pa.int64())
        if kind == "uint8":
            return pa.array(np.abs(np.array(ints, dtype=np.int64)).astype(np.uint8))
        if kind == "nullable-int":
            return pa.array([None if i == 0 else i for i in ints], pa.int64())
        if kind == "float":
            return pa.array([float("nan") if i == 0 else i / 2 for i in ints], pa.float64())
        if kind == "bool":
            return pa.array([i > 0 for i in ints], pa.bool_())
        if kind == "list":
            return pa.array([["a", "b"][: abs(i)] for i in ints], pa.list_(pa.string()))
        if kind == "binary":
            return pa.array([b"\xff" * abs(i) for i in ints], pa.binary())
        return pa.nulls(n)

    kinds = ["string", "labels", "dictionary", "int64", "uint8", "nullable-int", "float", "bool", "list",
             "binary", "null"]
    text_kind = draw(st.sampled_from(["good-text"] * 16 + kinds))
    label_kind = draw(st.sampled_from(["labels", "dictionary", "int64", "uint8"] * 6 + kinds))
    names = ["text", "label"]
    arrays = [column(text_kind), column(label_kind)]
    for name in draw(st.lists(st.sampled_from(["title", "other"]), max_size=2, unique=True)):
        names.append(name)
        arrays.append(column(draw(st.sampled_from(["good-text", *kinds]))))
    duplicate = draw(st.sampled_from([None] * 6 + ["text", "label"]))  # two columns of one name
    if duplicate:
        names.append(duplicate)
        arrays.append(column(draw(st.sampled_from(kinds))))
    keep = draw(st.sampled_from([None] * 6 + [{"text"}, {"label"}, {"title", "text", "label"}]))
    pairs = [(nm, a) for nm, a in zip(names, arrays) if keep is None or nm in keep]
    table = pa.table([a for _, a in pairs], names=[nm for nm, _ in pairs])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# Folder per class. Names are bytes so that undecodable (non-UTF-8) folder names can be made.
CLASS_NAMES = [b"\xc2\xb2", b"--1", b" ", b"a b", b".hidden", b"\xff\xfe", b"\xed\xa0\x80"]
name_bytes = st.one_of(
    st.sampled_from([b"sport", b"tech", b"food"]), st.sampled_from([b"sport", b"tech", b"food", b"1", b"2"]),
    st.sampled_from(CLASS_NAMES),
    st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")),
)
good_file = st.sampled_from([t.encode() for t in GOOD_TEXTS])
bad_file = st.one_of(
    st.sampled_from([b"", b" \n", b"\xff\xfe\x00", b"caf\xe9", b"\xef\xbb\xbf", b"\xed\xa0\x80 half", b"\x00"]),
    st.binary(max_size=20),
)
folders = st.fixed_dictionaries(
    {
        "classes": st.sampled_from([0, 1, 2, 2, 3, 3, 4]).flatmap(
            lambda k: st.dictionaries(
                name_bytes, st.integers(0, 8).flatmap(lambda n: st.lists(good_file, min_size=n, max_size=n)),
                min_size=k, max_size=k,
            )
        ),
        "bad_files": st.sampled_from([0, 0, 0, 1, 2]).flatmap(  # into some class
            lambda n: st.lists(st.tuples(st.integers(0, 10**6), bad_file), min_size=n, max_size=n)
        ),
        "loose_files": st.lists(good_file | bad_file, max_size=1),  # files next to the class folders
        "nested": st.booleans(),  # a sub-folder inside a class folder
    }
)


def write_folder(root: Path, spec: dict) -> None:
    broot = os.fsencode(root)
    classes = {name: list(files) for name, files in spec["classes"].items()}
    for pos, content in spec["bad_files"]:
        if classes:
            classes[list(classes)[pos % len(classes)]].append(content)
    for name, files in classes.items():
        d = os.path.join(broot, name)
        os.makedirs(d, exist_ok=True)
        for i, content in enumerate(files):
            with open(os.path.join(d, b"%d.txt" % i), "wb") as f:
                f.write(content)
        if spec["nested"]:
            os.makedirs(os.path.join(d, b"sub"), exist_ok=True)
            Path(os.fsdecode(os.path.join(d, b"sub", b"x.txt"))).write_bytes(b"nested text")
    for i, content in enumerate(spec["loose_files"]):
        (root / f"loose{i}.txt").write_bytes(content)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_files_load_or_fail_with_a_data_error(fmt, scratch):
    sep = "\t" if fmt == "tsv" else ","

    @SETTINGS
    @given(content=mutated(delimited_files(sep)), opts=data_configs,
           val=st.none() | mutated(delimited_files(sep)))
    def prop(content, opts, val):
        with fresh_dir(scratch) as d, shown(content=content, val=val, opts=opts):
            path = d / f"train.{fmt}"
            path.write_bytes(content)
            extra = {}
            if val is not None:
                (d / f"val.{fmt}").write_bytes(val)
                extra["validation_path"] = str(d / f"val.{fmt}")
            attempt(fmt, data_cfg(path, opts, **extra), str(path), *extra.values())

    prop()


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_files_load_or_fail_with_a_data_error(fmt, scratch):
    @SETTINGS
    @given(content=mutated(json_docs() if fmt == "json" else jsonl_docs()), opts=data_configs)
    def prop(content, opts):
        with fresh_dir(scratch) as d, shown(content=content, opts=opts):
            path = d / f"train.{fmt}"
            path.write_bytes(content)
            attempt(fmt, data_cfg(path, opts), str(path))

    prop()


def test_parquet_files_load_or_fail_with_a_data_error(scratch):
    @SETTINGS
    @given(content=mutated(parquet_files()), opts=data_configs)
    def prop(content, opts):
        with fresh_dir(scratch) as d, shown(content=content, opts=opts):
            path = d / "train.parquet"
            path.write_bytes(content)
            attempt("parquet", data_cfg(path, opts), str(path))

    prop()


def test_class_folders_load_or_fail_with_a_data_error(scratch):
    @SETTINGS
    @given(spec=folders, opts=data_configs)
    def prop(spec, opts):
        with fresh_dir(scratch) as d, shown(spec=spec, opts=opts):
            root = d / "corpus"
            root.mkdir()
            write_folder(root, spec)
            attempt("folder", data_cfg(root, opts), str(root))

    prop()


# Well-formed files: at least 2 classes with at least 3 rows each, so every split is non-empty.
clean_text = st.text(min_size=1, max_size=30).filter(lambda t: t.strip())
clean_label = st.text(min_size=1, max_size=8).filter(lambda t: t.strip())


@st.composite
def clean_datasets(draw) -> list[tuple[str, str]]:
    classes = draw(st.lists(clean_label, min_size=2, max_size=4, unique_by=str.strip))
    out = []
    for label in classes:
        out += [(t, label) for t in draw(st.lists(clean_text, min_size=3, max_size=6))]
    return draw(st.permutations(out))


def write_clean(fmt: str, d: Path, data: list[tuple[str, str]], ascii_json: bool) -> Path:
    if fmt in ("csv", "tsv-csv"):
        out = io.StringIO()
        # The csv module's default \r\n terminator: a bare \r inside a field gets quoted then.
        w = csv.writer(out, delimiter="\t" if fmt == "tsv-csv" else ",")
        w.writerow(["text", "label"])
        w.writerows(data)
        (path := d / f"data.{fmt.split('-')[0]}").write_bytes(out.getvalue().encode("utf-8"))
    elif fmt == "tsv":  # TSV as NLP data sets ship it: no quoting at all
        lines = ["text\tlabel", *(f"{t}\t{lbl}" for t, lbl in data)]
        (path := d / "data.tsv").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    elif fmt == "lines":
        path = d / "corpus"
        path.mkdir()
        by_label: dict[str, list[str]] = {}
        for t, lbl in data:
            by_label.setdefault(lbl, []).append(t)
        for lbl, texts in by_label.items():
            (path / f"{lbl}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    elif fmt == "json":
        doc = [{"text": t, "label": lbl} for t, lbl in data]
        (path := d / "data.json").write_text(json.dumps(doc, ensure_ascii=ascii_json), encoding="utf-8")
    elif fmt == "jsonl":
        lines = [json.dumps({"text": t, "label": lbl}, ensure_ascii=ascii_json) for t, lbl in data]
        (path := d / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "parquet":
        import pandas as pd

        path = d / "data.parquet"
        pd.DataFrame(data, columns=["text", "label"]).to_parquet(path)
    else:
        path = d / "corpus"
        for i, (t, lbl) in enumerate(data):
            (path / lbl).mkdir(parents=True, exist_ok=True)
            (path / lbl / f"{i}.txt").write_text(t, encoding="utf-8")
    return path


def _folder_safe(label: str) -> bool:
    return "/" not in label and "\0" not in label and not label.startswith(".") and len(label.encode()) < 200


ROUND_TRIP_FORMATS = [*FORMATS, "tsv-csv", "lines"]
_LINE_BREAKS = ("\t", "\n", "\r")


@pytest.mark.parametrize("fmt", ROUND_TRIP_FORMATS)
def test_well_formed_files_round_trip(fmt, scratch):
    """Every format reads back every row as written (text and label stripped), any Unicode."""

    @settings(SETTINGS, max_examples=ROUND_TRIP_EXAMPLES)
    @given(data=clean_datasets(), ascii_json=st.booleans())
    def prop(data, ascii_json):
        if fmt in ("folder", "lines"):  # a folder (file) name is the label: no '/', no NUL, not hidden
            data = [(t, lbl.strip()) for t, lbl in data if _folder_safe(lbl.strip())]
        if fmt in ("tsv", "lines"):  # an unquoted line cannot hold a tab or a line break
            data = [(t, lbl) for t, lbl in data if not any(c in t + lbl for c in _LINE_BREAKS)]
        if fmt == "lines":  # one example per line: its text is the stripped line, its label the file name
            data = [(t, lbl) for t, lbl in data if "." not in lbl]
        if len({lbl.strip() for _, lbl in data}) < 2 or min(Counter(lbl.strip() for _, lbl in data).values()) < 3:
            return
        with fresh_dir(scratch) as d, shown(data=data, ascii_json=ascii_json):
            path = write_clean(fmt, d, data, ascii_json)
            extra = {"quoting": "csv"} if fmt == "tsv-csv" else {}
            splits = load_splits(config_from_dict({"data": {"path": str(path), **extra}}).data)
            assert_well_formed(splits, expected_rows=len(data))
            got = Counter(
                (t, lbl) for f in (splits.train, splits.val, splits.test) for t, lbl in zip(f["text"], f["label"])
            )
            assert got == Counter((t.strip(), lbl.strip()) for t, lbl in data)
            _count("round-trip", f"accepted:{fmt}")

    prop()


# Inputs that broke the readers once (each escaped as a non-raypipe exception or was misread), kept
# here so that they are tried on every run whatever the generators above happen to draw.
DEEP = "[" * 100_000 + "]" * 100_000
ROWS = [{"text": f"words number {i}", "label": "ab"[i % 2]} for i in range(20)]


def _rows_with(**change: object) -> list[dict]:
    return [{**r, **change} if i == 3 else r for i, r in enumerate(ROWS)]


HAND_PICKED = {
    # was RecursionError from json.loads
    "json-nested-too-deep": ("json", '{"data": ' + DEEP + "}", {}, "nested too deeply"),
    "jsonl-line-nested-too-deep": ("jsonl", json.dumps(ROWS[0]) + "\n" + DEEP, {}, "nested too deeply"),
    # was UnicodeEncodeError from pandas (and TypeError from the tokenizer had it got through)
    "json-lone-surrogate-text-strict": ("json", json.dumps(_rows_with(text="a\ud800b")),
                                        {"encoding_errors": "strict"}, "unpaired surrogate"),
    "json-lone-surrogate-text-replace": ("json", json.dumps(_rows_with(text="a\ud800b")), {}, None),
    "jsonl-lone-surrogate-key-replace": ("jsonl", "\n".join(json.dumps(r) for r in _rows_with(**{"\udc80": 1})),
                                         {}, None),
    "json-lone-surrogate-label-strict": ("json", json.dumps(_rows_with(label="\udfff")),
                                         {"encoding_errors": "strict"}, "unpaired surrogate"),
    # was a false rejection: str.splitlines() cut the line inside a string at U+2028 / U+0085
    "jsonl-raw-line-separator-in-text": (
        "jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in _rows_with(text="a\u2028b\x85c\u2029d")), {}, None,
    ),
    # was ValueError from int() in sort_labels: "²".isdigit() is True, "--1".lstrip("-") is "1"
    "superscript-digit-labels": ("json", json.dumps([{**r, "label": "²³"[i % 2]} for i, r in enumerate(ROWS)]), {}, None),
    "double-minus-label": ("json", json.dumps([{**r, "label": ["--1", "2"][i % 2]} for i, r in enumerate(ROWS)]),
                           {}, None),
    # did not name the file
    "too-few-rows-for-a-validation-split": ("json", json.dumps(ROWS[:2]), {}, "validation split is empty"),
    # was UnicodeEncodeError from pandas: the folder name becomes a label
    "folder-name-not-utf8": ("folder", {b"sport": ROWS, b"t\xffch": ROWS}, {}, "folder name"),
    "folder-name-blank": ("folder", {b"sport": ROWS, b" ": ROWS}, {}, "folder name"),
}


@pytest.mark.parametrize("case", sorted(HAND_PICKED))
def test_hand_picked_inputs(case, scratch):
    fmt, content, opts, error = HAND_PICKED[case]
    with fresh_dir(scratch) as d:
        if fmt == "folder":
            path = d / "corpus"
            for name, rows_ in content.items():
                os.makedirs(os.path.join(os.fsencode(path), name))
                for i, r in enumerate(rows_):
                    Path(os.fsdecode(os.path.join(os.fsencode(path), name, b"%d.txt" % i))).write_text(r["text"])
        else:
            path = d / f"train.{fmt}"
            path.write_text(content, encoding="utf-8")
        cfg = config_from_dict({"data": {"path": str(path), **opts}}).data
        if error is None:
            splits = load_splits(cfg)
            assert_well_formed(splits, expected_rows=len(ROWS))
        else:
            with pytest.raises(DataError, match=error) as info:
                load_splits(cfg)
            assert str(path) in str(info.value)


def test_reader_properties_summary():
    """Runs after the properties above: how many files were tried, and what came back."""
    seconds = time.perf_counter() - T0[0] if T0 else 0.0
    by_format = {fmt: dict(sorted(c.items())) for fmt, c in STATS.items()}
    totals: Counter = Counter()
    for fmt, c in STATS.items():
        if fmt == "round-trip":
            continue
        for outcome, n in c.items():
            totals[outcome.split(":")[-1] if outcome.startswith("rejected") else outcome] += n
    summary = {
        "cases": sum(sum(c.values()) for c in STATS.values()),
        "malformed_cases": sum(totals.values()),
        "accepted": totals["accepted"],
        "rejected_by_error": {k: v for k, v in totals.items() if k != "accepted"},
        "rejected_by_reason": dict(REASONS.most_common()),
        "round_trip_cases": sum(STATS.get("round-trip", Counter()).values()),
        "by_format": by_format,
        "other_exceptions": 0,  # any other exception fails the properties above
        "seconds": round(seconds, 1),
    }
    print("\nRELIABILITY reader_properties", json.dumps(summary))
    # Not vacuous: every format was tried with many malformed files, most of them rejected, and every
    # reader accepted its well-formed files. (Which malformed files happen to be accepted depends on
    # what hypothesis draws, and that shifts when other hypothesis users ran first in the session,
    # e.g. schemathesis: seen as 0 accepted Parquet files of 150. So per format that is not asserted.)
    assert totals["accepted"] > 0, summary
    for fmt in FORMATS:
        c = STATS.get(fmt, Counter())
        assert sum(c.values()) >= MAX_EXAMPLES // 2 and sum(c.values()) > c["accepted"], (fmt, dict(c))
    for fmt in ROUND_TRIP_FORMATS:
        assert STATS["round-trip"][f"accepted:{fmt}"] >= ROUND_TRIP_EXAMPLES // 3, (fmt, summary)
