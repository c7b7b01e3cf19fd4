"""Batch inference on Ray Data: score whole files with a checkpoint or a registered model.

``raypipe predict --model models:/name@alias --input <file|folder|glob> --output <file>`` and
:func:`run` (``raypipe.batch_predict``) read CSV/TSV/JSON/JSONL/Parquet with the training
readers' column options (``data.text_columns``, ``data.text_pair_column``, ``data.tokens_column``,
``data.header``/``columns``, ``data.quoting``, ``data.encoding``/``encoding_errors``), run the
model in a pool of Ray actors and write one file with the input's columns plus the prediction.

How it is put together
----------------------
* **Reading** is a Ray Data :class:`~ray.data.Datasource` of raypipe's own (:class:`_Files`): one
  read task per file (per group of row groups for Parquet), each streaming its file in blocks of
  ``_ROWS_PER_BLOCK`` rows (pyarrow's streaming CSV reader, line-by-line JSONL, Parquet row
  groups), so an input larger than memory is fine. A JSON *array* file is parsed whole (it
  cannot be streamed; use JSONL for big inputs). Every row carries its file and row number, so a
  rejected row is reported as ``file row N``. Read tasks reserve no CPU: they are light next to
  the model, and Ray Data's own file listing would otherwise wait for a CPU the actors hold.
* **Scoring** is ``map_batches`` with a callable class (:class:`_Scorer`) in an
  ``ActorPoolStrategy``: one model load per actor, torch threads = the actor's CPU reservation,
  or one GPU per actor when ``scaling.use_gpu`` resolves true. Each actor calls the same
  :class:`~raypipe.predict.Predictor` as Serve, evaluation and the pyfunc, so a row scores
  exactly as ``Predictor.predict`` scores it.
* **Bad rows are never dropped**: a missing/empty/non-text input, or one longer than the model's
  ``max_length`` tokens (``predict.overlong: reject``, the default; ``truncate`` scores it), is
  written with null prediction columns and its reason in ``reject_reason``.
* **Writing** happens on the driver, in input order (``preserve_order``), into a temporary file
  beside the output that is renamed onto it only when every row is written: a failed or
  interrupted job leaves no half-written file under the final name. Each row gets ``row_id``
  (0-based position in the input), ``model_name`` and ``model_version``; ``source_file`` too when
  the input is several files.
* The columns of a prediction come from the task's ``prediction_model`` (pydantic), typed for
  Parquet (``pred_probabilities`` is a map, ``pred_entities`` a list of structs); CSV/TSV cells
  hold nested values as JSON.

Sizing defaults (``predict.*``): one actor per node with CPUs, each reserving and using the CPUs
the actors share (at most one node's); one actor per GPU on a GPU cluster; 64 texts per forward
pass on CPU, 256 on GPU.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import math
import os
import re
import sys
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.errors import ConfigError, DataError, RaypipeError

log = logging.getLogger("raypipe.batch")

INPUT_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")
OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
                  ".jsonl": "jsonl", ".ndjson": "jsonl"}
_ROWS_PER_BLOCK = 4096
_HIDDEN = ("_file", "_row", "_reason")  # reader -> scorer -> driver, never written
_SCORER_HIDDEN = ("_node", "_truncated")
PREFIX = "pred_"
REASON = "reject_reason"
_FIRST_REJECTS = 5


# --------------------------------------------------------------------------- result


@dataclass
class BatchResult:
    output: str
    model_uri: str
    model_name: str | None
    model_version: str | None
    task: str
    input: str
    files: int
    rows_read: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    rows_truncated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_rejected: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    scoring_s: float = 0.0  # first block out of the pool to the last one written
    actors: int = 0
    cpus_per_actor: float = 0.0
    gpus_per_actor: float = 0.0
    batch_size: int = 0
    rows_per_node: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        rejected = f"{self.rows_rejected:,} rejected"
        if self.rows_rejected:
            why = ", ".join(f"{r}: {n:,}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
            rejected += f" ({why}; first: {'; '.join(self.first_rejected[:3])})"
        truncated = f", {self.rows_truncated:,} truncated" if self.rows_truncated else ""
        nodes = len(self.rows_per_node)
        return (f"[raypipe] predict: {self.rows_read:,} rows read, {self.rows_scored:,} scored{truncated}, "
                f"{rejected} -> {self.output} ({self.rows_per_s:,.0f} rows/s in {self.wall_s:.1f} s, "
                f"{self.actors} actor(s) on {nodes} node(s))")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "rows_per_s": self.rows_per_s}


# --------------------------------------------------------------------------- inputs


def input_files(spec: str, data: Any) -> tuple[list[str], str]:
    """(sorted files, format) of a file, a folder (its files of one format) or a glob."""
    spec = os.path.expanduser(str(spec))
    if re.search(r"[*?\[]", spec):
        files = sorted(f for f in globlib.glob(spec, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"--input {spec}: the pattern matches no file")
    elif Path(spec).is_dir():
        files = sorted(str(f) for f in Path(spec).iterdir()
                       if f.is_file() and not f.name.startswith((".", "_")) and _format(str(f), "auto", strict=False))
        if not files:
            raise DataError(f"--input {spec}: the folder holds no CSV/TSV/JSON/JSONL/Parquet file")
    elif Path(spec).is_file():
        files = [spec]
    else:
        raise DataError(f"--input {spec}: no such file or folder")
    formats = {_format(f, data.format) for f in files}
    if len(formats) > 1:
        raise DataError(f"--input {spec}: files of several formats ({', '.join(sorted(formats))}); "
                        "score one format at a time or set data.format")
    return [str(Path(f).resolve()) for f in files], formats.pop()


def _format(path: str, fmt: str, strict: bool = True) -> str:
    if fmt != "auto":
        if fmt not in INPUT_FORMATS:
            raise ConfigError(f"data.format: batch prediction reads {', '.join(INPUT_FORMATS)}, not '{fmt}'")
        return fmt
    suffix = Path(path).suffix.lower()
    found = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}.get(suffix)
    if found is None and strict:
        raise DataError(f"{path}: cannot tell the format from the suffix; set data.format "
                        f"({', '.join(INPUT_FORMATS)})")
    return found or ""


def _csv_names(path: str, fmt: str, data: Any) -> list[str]:
    """The column names of a CSV/TSV file as the training reader names them."""
    import csv
    import io

    from raypipe.data import _quoting

    with open(path, "rb") as f:
        head = f.read(1 << 20)
    text = head.decode(data.encoding, errors="replace").removeprefix("\ufeff")
    quoting = _quoting(fmt, data)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
    first = next((row for row in reader if row and row != [""]), None)
    if first is None:
        raise DataError(f"{path}: no rows")
    if data.columns is not None:
        if len(data.columns) != len(first):
            raise DataError(f"{path}: data.columns names {len(data.columns)} columns but the first line has "
                            f"{len(first)}")
        return list(data.columns)
    if data.header:
        names = [n.strip() for n in first]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{path}: the header names column(s) {dupes} more than once; rename them or set data.columns")
        return names
    return [str(i) for i in range(len(first))]


def _json_object(line: str, path: str, n: int) -> dict[str, Any]:
    """One JSONL line as an object, or a DataError naming the file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: line {n} is {type(obj).__name__}, expected an object")
    return obj


def _columns(path: str, fmt: str, data: Any) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    if fmt in ("csv", "tsv"):
        return _csv_names(path, fmt, data)
    if fmt == "jsonl":
        with open(path, encoding=data.encoding, errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    return list(_json_object(line, path, n))
        raise DataError(f"{path}: no rows")
    from raypipe.data import _read_json

    frame = _read_json(path, fmt, data)
    if not len(frame):
        raise DataError(f"{path}: no rows")
    return [str(c) for c in frame.columns]


@dataclass
class Plan:
    """Which input columns feed the model, and how: ``kind`` is text, pair or tokens."""

    kind: str
    text_columns: list[str]
    separator: str = " "
    pair_column: str | None = None
    tokens_column: str | None = None

    def needed(self) -> list[str]:
        cols = list(self.text_columns)
        return cols + [c for c in (self.pair_column, self.tokens_column) if c]


def plan_columns(path: str, columns: list[str], data: Any, inputs: str) -> Plan:
    have = set(columns)

    def need(col: str, key: str, flag: str) -> None:
        if col not in have:
            raise DataError(f"{path}: no column '{col}' to read the model's input from (columns: "
                            f"{', '.join(columns)}); set {key} (or {flag})")

    if inputs == "tokens" and data.tokens_column in have:
        return Plan("tokens", [], tokens_column=data.tokens_column)
    if inputs == "chat" and not set(data.text_columns) <= have and "prompt" in have:
        return Plan("text", ["prompt"])  # a language model's prompts, as its pyfunc reads them
    for c in data.text_columns:
        need(c, "data.text_columns", "--text-column")
    if inputs == "pair":
        if len(data.text_columns) != 1:
            raise ConfigError("data.text_columns: a sentence-pair model takes one first text column "
                              f"and data.text_pair_column; got {data.text_columns}")
        pair = data.text_pair_column or "text_pair"
        if pair not in have:
            raise DataError(f"{path}: this model compares two texts; no column '{pair}' for the second "
                            f"(columns: {', '.join(columns)}); set data.text_pair_column (or --pair-column)")
        return Plan("pair", list(data.text_columns), pair_column=pair)
    return Plan(inputs if inputs == "tokens" else "text", list(data.text_columns), separator=data.text_separator)


def count_rows(files: list[str], fmt: str, data: Any) -> tuple[int | None, bool]:
    """(rows, exact): Parquet metadata is exact; CSV/TSV/JSONL lines are a close estimate (a quoted
    field over several lines counts more than once); a JSON array is not counted."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files), True
    if fmt == "json":
        return None, False
    total = 0
    for f in files:
        lines, last = 0, b"\n"
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"
        total += lines - (1 if fmt in ("csv", "tsv") and data.header else 0)
    return max(total, 0), False


# --------------------------------------------------------------------------- reading (Ray Data)


def _with_position(table: Any, file_index: int, first_row: int) -> Any:
    import pyarrow as pa

    n = table.num_rows
    table = table.append_column("_file", pa.array([file_index] * n, pa.int32()))
    return table.append_column("_row", pa.array(range(first_row, first_row + n), pa.int64()))


def _read_csv(path: str, fmt: str, data: Any, names: list[str], file_index: int) -> Any:
    import codecs

    import pyarrow as pa
    import pyarrow.csv as pcsv

    from raypipe.data import _quoting

    utf8 = codecs.lookup(data.encoding).name == "utf-8"
    quoting = _quoting(fmt, data)
    reader_opts = pcsv.ReadOptions(block_size=16 << 20, column_names=names,
                                   skip_rows=1 if data.header else 0,
                                   encoding="utf8" if utf8 else data.encoding)
    parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                              quote_char='"' if quoting == "csv" else False,
                              newlines_in_values=quoting == "csv", ignore_empty_lines=True)
    # Every column as the training reader has it: text, never inferred numbers or nulls. UTF-8 is
    # read as bytes and decoded here, so data.encoding_errors applies (pyarrow would only fail).
    kind = pa.binary() if utf8 else pa.string()
    convert = pcsv.ConvertOptions(column_types={c: kind for c in names}, strings_can_be_null=False,
                                  quoted_strings_can_be_null=False)
    row = 1
    try:
        stream = pcsv.open_csv(path, read_options=reader_opts, parse_options=parse, convert_options=convert)
        for batch in stream:
            table = pa.Table.from_batches([batch])
            if utf8:
                table = _decode_columns(table, path, row, data)
            yield _with_position(table, file_index, row)
            row += table.num_rows
    except pa.ArrowInvalid as exc:
        hint = (" (a text holding a tab? with data.quoting: none a TSV field cannot hold one)"
                if quoting == "none" else " (check the quoting near there)")
        raise DataError(f"{path}: after row {row - 1}: cannot parse as {fmt.upper()}: {exc}{hint}") from None


def _decode_columns(table: Any, path: str, first_row: int, data: Any) -> Any:
    import pyarrow as pa

    cols = []
    for name in table.column_names:
        col = table.column(name)
        try:
            cols.append(col.cast(pa.string()))
            continue
        except pa.ArrowInvalid:
            pass
        values = []
        for i, v in enumerate(col.to_pylist()):
            try:
                values.append(v.decode("utf-8", errors=data.encoding_errors))
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: row {first_row + i}: column {name!r} is not valid UTF-8 at byte "
                                f"{exc.start} (set data.encoding, e.g. latin-1, or data.encoding_errors: "
                                "replace)") from None
        cols.append(pa.array(values, pa.string()))
    return pa.table(cols, names=table.column_names)


def _rows_table(rows: list[dict[str, Any]], path: str, first_row: int, what: str) -> Any:
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: {what} {first_row}-{first_row + len(rows) - 1}: a column holds values of "
                        f"different types ({exc}); give each column one type") from None


def _text_cells(rows: list[dict[str, Any]], text_cols: list[str]) -> None:
    """A text cell that is not a string is kept out of the Arrow column (one type per column) and
    noted as the row's reason, so the row is written and reported, not lost."""
    for r in rows:
        for c in text_cols:
            v = r.get(c)
            if v is not None and not isinstance(v, str):
                r[c] = None
                r["_reason"] = r.get("_reason") or f"'{c}' is {type(v).__name__}, not a text"
        r.setdefault("_reason", None)


def _read_jsonl(path: str, data: Any, text_cols: list[str], file_index: int) -> Any:
    from raypipe.data import _no_lone_surrogates

    rows: list[dict[str, Any]] = []
    first_line = row = 1
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(data.encoding, errors=data.encoding_errors)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {n}: not valid {data.encoding} at byte {exc.start} (set "
                                "data.encoding, or data.encoding_errors: replace)") from None
            if not line.strip():
                continue
            rows.append(_no_lone_surrogates(_json_object(line, path, n), path, n, data))
            if len(rows) == _ROWS_PER_BLOCK:
                _text_cells(rows, text_cols)
                yield _with_position(_rows_table(rows, path, first_line, "lines"), file_index, row)
                row += len(rows)
                rows, first_line = [], n + 1
    if rows:
        _text_cells(rows, text_cols)
        yield _with_position(_rows_table(rows, path, first_line, "lines"), file_index, row)


def _read_json_array(path: str, data: Any, text_cols: list[str], file_index: int) -> Any:
    from raypipe.data import _read_json

    frame = _read_json(path, "json", data)
    rows = [{str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]
    for start in range(0, len(rows), _ROWS_PER_BLOCK):
        chunk = rows[start : start + _ROWS_PER_BLOCK]
        _text_cells(chunk, text_cols)
        yield _with_position(_rows_table(chunk, path, start + 1, "rows"), file_index, start + 1)


def _read_parquet(path: str, row_groups: list[int], first_row: int, file_index: int) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = first_row
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROWS_PER_BLOCK, row_groups=row_groups):
            table = pa.Table.from_batches([batch])
            yield _with_position(table, file_index, row)
            row += table.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read as Parquet after row {row - 1}: {exc}") from None


def _read_unit(unit: dict[str, Any], data: Any, text_cols: list[str]) -> Any:
    fmt, path, i = unit["format"], unit["path"], unit["file_index"]
    if fmt == "parquet":
        yield from _read_parquet(path, unit["row_groups"], unit["first_row"], i)
    elif fmt in ("csv", "tsv"):
        yield from _read_csv(path, fmt, data, unit["names"], i)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, data, text_cols, i)
    else:
        yield from _read_json_array(path, data, text_cols, i)


def _datasource(files: list[str], fmt: str, data: Any, text_cols: list[str], names: dict[str, list[str]]) -> Any:
    from functools import partial

    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    units: list[dict[str, Any]] = []
    for i, f in enumerate(files):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f).metadata
            start, groups, rows = 1, [], 0
            for g in range(meta.num_row_groups):  # about 64k rows per read task
                groups.append(g)
                rows += meta.row_group(g).num_rows
                if rows >= 65536 or g == meta.num_row_groups - 1:
                    units.append({"format": fmt, "path": f, "file_index": i, "row_groups": groups,
                                  "first_row": start, "rows": rows})
                    start, groups, rows = start + rows, [], 0
        else:
            units.append({"format": fmt, "path": f, "file_index": i, "names": names.get(f)})

    class Files(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return sum(os.path.getsize(f) for f in files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [
                ReadTask(partial(_read_unit, u, data, text_cols),
                         BlockMetadata(num_rows=u.get("rows"), size_bytes=os.path.getsize(u["path"]),
                                       exec_stats=None, input_files=(u["path"],)),
                         per_task_row_limit=per_task_row_limit)
                for u in units
            ]

    return Files()


# --------------------------------------------------------------------------- prediction columns


def arrow_type(annotation: Any) -> Any:
    """The Arrow type of a field of a task's pydantic ``prediction_model``."""
    import pyarrow as pa
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return arrow_type(inner[0])
    if origin in (list, tuple):
        return pa.list_(arrow_type(args[0]))
    if origin is dict:
        return pa.map_(arrow_type(args[0]), arrow_type(args[1]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([pa.field(n, arrow_type(f.annotation)) for n, f in annotation.model_fields.items()])
    simple = {str: pa.string(), float: pa.float64(), int: pa.int64(), bool: pa.bool_()}
    if annotation in simple:
        return simple[annotation]
    raise TypeError(f"no Arrow type for prediction field type {annotation!r}")


def prediction_fields(task: Any) -> dict[str, Any]:
    """``pred_<field>`` -> Arrow type, from the task's prediction model."""
    return {PREFIX + name: arrow_type(f.annotation) for name, f in task.prediction_model.model_fields.items()}


# --------------------------------------------------------------------------- scoring (actors)


class _Scorer:
    """One model per actor; ``__call__`` scores a block and adds the prediction columns."""

    def __init__(self, model_dir: str, model_uri: str, tracking_uri: str | None, device: str, threads: int,
                 plan: dict[str, Any], batch_size: int, overlong: str):
        import torch
        from transformers.utils import logging as hf_logging

        from raypipe.predict import Predictor

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is not progress
        if device == "cpu":
            torch.set_num_threads(threads)
        if not Path(model_dir).is_dir():  # another node: fetch the registered version there
            if not model_uri.startswith("models:/"):
                raise RaypipeError(f"the checkpoint dir {model_dir} is not on this node; put it on storage "
                                   "every node sees, or score a models:/ URI with a shared tracking server")
            from raypipe.registry import resolve

            model_dir = resolve(model_uri, tracking_uri=tracking_uri).path
        self.predictor = Predictor.from_dir(model_dir, device=device)
        self.plan = Plan(**plan)
        self.batch_size = batch_size
        self.overlong = overlong
        self.fields = prediction_fields(self.predictor.task)
        self.truncates = getattr(self.predictor.task, "long_inputs", "truncate") == "truncate"
        import ray

        # An actor knows its node; called outside Ray (a unit test), do not start one.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    # -- inputs and the reasons a row cannot be scored
    def _inputs(self, table: Any) -> tuple[list[Any], list[str | None]]:
        n = table.num_rows
        pre = table.column("_reason").to_pylist() if "_reason" in table.column_names else [None] * n
        reasons: list[str | None] = list(pre)
        plan = self.plan

        def texts(col: str) -> list[Any]:
            values = table.column(col).to_pylist()
            for i, v in enumerate(values):
                if reasons[i] is None:
                    if v is None:
                        reasons[i] = f"no text in '{col}'"
                    elif not isinstance(v, str):
                        reasons[i] = f"'{col}' is {type(v).__name__}, not a text"
                    elif not v.strip():
                        reasons[i] = f"empty text in '{col}'"
            return values

        if plan.kind == "tokens" and plan.tokens_column:
            items = table.column(plan.tokens_column).to_pylist()
            for i, words in enumerate(items):
                if reasons[i] is None:
                    if not words:
                        reasons[i] = f"no words in '{plan.tokens_column}'"
                    elif not all(isinstance(w, str) for w in words):
                        reasons[i] = f"'{plan.tokens_column}' holds a non-text word"
            return items, reasons
        if plan.kind == "pair":
            first, second = texts(plan.text_columns[0]), texts(plan.pair_column or "")
            return list(zip(first, second)), reasons
        if len(plan.text_columns) == 1:
            return texts(plan.text_columns[0]), reasons
        columns = [table.column(c).to_pylist() for c in plan.text_columns]
        joined: list[Any] = []
        for i, row in enumerate(zip(*columns)):  # several columns: empty parts are fine, all empty is not
            odd = next((c for c, v in zip(plan.text_columns, row) if v is not None and not isinstance(v, str)), None)
            parts = [v for v in row if isinstance(v, str) and v.strip()]
            if reasons[i] is None and odd is not None:
                reasons[i] = f"'{odd}' is {type(row[plan.text_columns.index(odd)]).__name__}, not a text"
            elif reasons[i] is None and not parts:
                reasons[i] = "empty text in " + ", ".join(f"'{c}'" for c in plan.text_columns)
            joined.append(plan.separator.join(parts))
        return joined, reasons

    def _overlong(self, items: list[Any], good: list[int]) -> dict[int, int]:
        """Row -> token count, for the rows longer than the model's max_length."""
        if not self.truncates or not good:
            return {}
        p = self.predictor
        pair = self.plan.kind == "pair"
        specials = p.tokenizer.num_special_tokens_to_add(pair=pair)
        limit = p.max_length - specials

        def nbytes(x: Any) -> int:
            return sum(len(s.encode("utf-8")) + 1 for s in x) if pair else len(x.encode("utf-8")) + 1

        candidates = [i for i in good if nbytes(items[i]) > limit]  # a token covers at least one byte
        if not candidates:
            return {}
        first = [items[i][0] if pair else items[i] for i in candidates]
        second = [items[i][1] for i in candidates] if pair else None
        ids = p.tokenizer(first, second, truncation=False, verbose=False)["input_ids"]
        return {i: len(x) for i, x in zip(candidates, ids) if len(x) > p.max_length}

    def _predict(self, items: list[Any]) -> list[Any]:
        try:
            return self.predictor.predict(items, batch_size=self.batch_size)
        except DataError:
            out: list[Any] = []
            for item in items:  # find the row(s) the model refuses; score the rest
                try:
                    out.append(self.predictor.predict([item], batch_size=1)[0])
                except DataError as exc:
                    out.append(str(exc))
            return out

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        n = table.num_rows
        items, reasons = self._inputs(table)
        good = [i for i in range(n) if reasons[i] is None]
        long = self._overlong(items, good)
        truncated = [False] * n
        for i, tokens in long.items():
            if self.overlong == "reject":
                reasons[i] = f"longer than max_length ({tokens} tokens > {self.predictor.max_length})"
            else:
                truncated[i] = True
        good = [i for i in good if reasons[i] is None]
        preds: list[Any] = [None] * n
        for i, p in zip(good, self._predict([items[i] for i in good]) if good else []):
            if isinstance(p, str):
                reasons[i] = p
            else:
                preds[i] = p
        for name, kind in self.fields.items():
            key = name[len(PREFIX):]
            values = [None if p is None else p[key] for p in preds]
            table = table.append_column(pa.field(name, kind), pa.array(values, kind))
        table = table.append_column(REASON, pa.array(reasons, pa.string()))
        table = table.append_column("_truncated", pa.array(truncated, pa.bool_()))
        return table.append_column("_node", pa.array([self.node] * n, pa.string()))


# --------------------------------------------------------------------------- writing (driver)


def _jsonable(v: Any) -> Any:
    if isinstance(v, list):
        if v and all(isinstance(x, tuple) and len(x) == 2 for x in v):  # an Arrow map
            return {k: _jsonable(x) for k, x in v}
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class _Writer:
    """Appends tables to a temporary file next to ``path``; :meth:`commit` renames it onto ``path``."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
        self.schema: Any = None
        self.sink: Any = None
        self.nested: list[str] = []

    def _open(self, table: Any) -> None:
        import pyarrow as pa

        # A column that is all-null in the first block is typed by a later one; text is the guess.
        self.schema = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f
                                 for f in table.schema])
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            self.sink = pq.ParquetWriter(self.tmp, self.schema)
        elif self.fmt in ("csv", "tsv"):
            import pyarrow.csv as pcsv

            self.nested = [f.name for f in self.schema if pa.types.is_nested(f.type)]
            flat = pa.schema([pa.field(f.name, pa.string()) if f.name in self.nested else f for f in self.schema])
            self.sink = pcsv.CSVWriter(self.tmp, flat, write_options=pcsv.WriteOptions(
                delimiter="\t" if self.fmt == "tsv" else ","))
        else:
            self.sink = open(self.tmp, "w", encoding="utf-8")

    def write(self, table: Any) -> None:
        import pyarrow as pa

        if self.sink is None:
            self._open(table)
        try:
            table = table.select(self.schema.names).cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
            raise DataError(f"the input's columns change type or shape between rows ({exc}); give each "
                            "column one type in every file") from None
        if self.fmt == "parquet":
            self.sink.write_table(table)
        elif self.fmt in ("csv", "tsv"):
            for name in self.nested:
                i = table.column_names.index(name)
                values = [None if v is None else json.dumps(_jsonable(v), ensure_ascii=False)
                          for v in table.column(name).to_pylist()]
                table = table.set_column(i, name, pa.array(values, pa.string()))
            self.sink.write_table(table)
        else:
            self.sink.write("".join(json.dumps(_jsonable(r), ensure_ascii=False, default=str) + "\n"
                                    for r in table.to_pylist()))

    def commit(self) -> None:
        if self.fmt == "jsonl":
            self.sink.flush()
            os.fsync(self.sink.fileno())
        self.sink.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.sink is not None:
                self.sink.close()
        except Exception:  # noqa: BLE001 - the original error is what matters
            pass
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- sizing


@dataclass
class Sizing:
    actors: int
    cpus: float
    gpus: float
    threads: int
    batch_size: int
    rows_per_call: int
    device: str


def sizing(predict: Any, use_gpu: bool, nodes: list[dict[str, Any]]) -> Sizing:
    """Actors, CPUs/GPUs per actor and batch sizes from ``predict.*`` and the live nodes."""
    cpu_nodes = [float(n["Resources"].get("CPU", 0)) for n in nodes if n.get("Alive")]
    cpu_nodes = [c for c in cpu_nodes if c >= 1] or [1.0]
    gpus_total = sum(float(n["Resources"].get("GPU", 0)) for n in nodes if n.get("Alive"))
    if use_gpu:
        actors = predict.concurrency or max(1, int(gpus_total))
        cpus, gpus = predict.num_cpus or 1.0, 1.0
        if actors > gpus_total:
            raise ConfigError(f"predict.concurrency: {actors} GPU actors, but the cluster has {gpus_total:g} GPU(s)")
    else:
        actors = predict.concurrency or len(cpu_nodes)
        cpus = predict.num_cpus or float(max(1, min(max(cpu_nodes), math.floor(sum(cpu_nodes) / actors))))
        gpus = 0.0
        if cpus > max(cpu_nodes):
            raise ConfigError(f"predict.num_cpus: {cpus:g} CPUs per actor, but the largest node has {max(cpu_nodes):g}")
        if actors * cpus > sum(cpu_nodes):
            raise ConfigError(f"predict: {actors} actor(s) x {cpus:g} CPU = {actors * cpus:g} CPU, but the cluster "
                              f"has {sum(cpu_nodes):g}; lower predict.concurrency or predict.num_cpus")
    batch = predict.batch_size or (256 if use_gpu else 64)
    return Sizing(actors=actors, cpus=cpus, gpus=gpus, threads=max(1, int(cpus)), batch_size=batch,
                  rows_per_call=max(1024, 4 * batch), device="cuda" if use_gpu else "cpu")


# --------------------------------------------------------------------------- the job


def _user_error(exc: BaseException) -> RaypipeError | None:
    """The raypipe error inside a Ray task/actor failure (Ray wraps it, with a traceback)."""
    from raypipe import errors

    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaypipeError) and type(e).__module__ == errors.__name__:
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    m = re.search(r"raypipe\.errors\.(DataError|ConfigError|CheckpointError|RegistryError): (.+)", str(exc))
    return getattr(errors, m.group(1))(m.group(2).strip()) if m else None


def reason_kind(why: str) -> str:
    """A rejection reason without its row's details: "longer than max_length (312 tokens > 128)"
    -> "longer than max_length", "empty text in 'text'" -> "empty text"."""
    kind = re.sub(r"\s*\(.*\)$", "", why)
    kind = re.sub(r"\s+in\s+'[^']*'(,\s*'[^']*')*$", "", kind)
    return re.sub(r"^'[^']*'\s+", "", kind).strip() or why


def _fmt_eta(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Progress:
    def __init__(self, total: int | None, exact: bool, every_s: float = 5.0, out: Any = None):
        self.total, self.exact, self.every = total, exact, every_s
        self.t0 = self.last = time.monotonic()
        self.out = out or sys.stdout

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        line = f"[raypipe] predict: {done:,}"
        if self.total:
            line += f"/{'' if self.exact else '~'}{self.total:,} rows ({min(done / self.total, 1):.0%})"
        else:
            line += " rows"
        line += f" · {rate:,.0f} rows/s"
        if self.total and rate > 0 and done < self.total:
            line += f" · ETA {_fmt_eta((self.total - done) / rate)}"
        print(line, file=self.out, flush=True)


def run(model: str, input: str, output: str, cfg: Any = None, *, overwrite: bool = False, log_run: bool = True,
        progress_every_s: float = 5.0) -> BatchResult:
    """Score every row of ``input`` with ``model`` into ``output``; see the module docstring."""
    from raypipe.config import RaypipeConfig

    cfg = cfg if cfg is not None else RaypipeConfig()
    t0 = time.monotonic()
    out = Path(output).expanduser()
    out_fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if out_fmt is None:
        raise ConfigError(f"--output {output}: write .parquet, .csv, .tsv or .jsonl (the suffix picks the format)")
    if out.is_dir():
        raise ConfigError(f"--output {output} is a folder; name a file, e.g. {out / 'scored.parquet'}")
    if out.exists() and not overwrite:
        raise ConfigError(f"--output {output} exists; pass --overwrite to replace it (nothing was written)")
    files, fmt = input_files(input, cfg.data)
    if str(out.resolve()) in files:
        raise ConfigError(f"--output {output} is also an input file")

    from raypipe import tasks
    from raypipe.model import read_meta
    from raypipe.registry import resolve

    tracking_uri = cfg.resolved_tracking_uri
    resolved = resolve(model, tracking_uri=tracking_uri if str(model).startswith("models:/") else None)
    meta = read_meta(resolved.path)
    task_name, schema = tasks.schema_of(meta)
    task = tasks.get(task_name)
    names = {f: _columns(f, fmt, cfg.data) for f in files}
    plan = plan_columns(files[0], names[files[0]], cfg.data, str(schema.get("inputs") or "text"))
    for f, cols in names.items():
        missing = [c for c in plan.needed() if c not in cols]
        if missing and fmt != "jsonl":
            raise DataError(f"{f}: no column(s) {missing} (columns: {', '.join(cols)})")
    fields = prediction_fields(task)
    taken = sorted(set(names[files[0]]) & {*fields, REASON, "row_id", "model_name", "model_version", "source_file"})
    if taken:
        raise DataError(f"{files[0]}: the input already has column(s) {taken}, which the output adds; rename them")
    total, exact = count_rows(files, fmt, cfg.data)

    import ray

    from raypipe.runtime import ensure_ray, resolve_use_gpu

    ensure_ray(cfg)
    use_gpu = resolve_use_gpu(cfg)
    size = sizing(cfg.predict, use_gpu, ray.nodes())
    result = BatchResult(output=str(out), model_uri=str(model), model_name=resolved.name or meta.get("model_name"),
                         model_version=resolved.version, task=task_name, input=str(input), files=len(files),
                         actors=size.actors, cpus_per_actor=size.cpus, gpus_per_actor=size.gpus,
                         batch_size=size.batch_size)
    print(f"[raypipe] predict: {len(files)} {fmt} file(s){f', {total:,} rows' if exact and total else ''} with "
          f"{result.model_name or resolved.path}{f' v{resolved.version}' if resolved.version else ''} "
          f"({task_name}) on {size.actors} actor(s) x {size.cpus:g} CPU{f' + {size.gpus:g} GPU' if size.gpus else ''}, "
          f"batch {size.batch_size}", flush=True)

    import pyarrow as pa
    import ray.data as rd

    quiet = logging.getLogger("ray.data")
    level = quiet.level
    # raypipe prints its own progress, and raises a bad row's error itself: Ray Data's plan, bars
    # and its copy of that error with a traceback through its executor are noise.
    quiet.setLevel(logging.CRITICAL)
    ctx = rd.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.execution_options.verbose_progress,
             ctx.wait_for_min_actors_s)
    writer = _Writer(out, out_fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True  # output rows in input order
        ctx.execution_options.verbose_progress = False
        # Start every actor before the first block goes out: the first one up would otherwise
        # take the first blocks while the others still load the model (and a small job would
        # never reach the other nodes). sizing() has checked that they fit the cluster.
        ctx.wait_for_min_actors_s = 600
        text_cols = [c for c in (*plan.text_columns, plan.pair_column) if c]
        ds = rd.read_datasource(_datasource(files, fmt, cfg.data, text_cols, names), num_cpus=0)
        ds = ds.map_batches(
            _Scorer,
            fn_constructor_kwargs={
                "model_dir": resolved.path, "model_uri": str(model),
                "tracking_uri": tracking_uri if str(model).startswith("models:/") else None,
                "device": size.device, "threads": size.threads, "plan": plan.__dict__,
                "batch_size": size.batch_size, "overlong": cfg.predict.overlong,
            },
            batch_size=size.rows_per_call, batch_format="pyarrow", zero_copy_batch=True,
            # Two blocks in flight per actor (one scoring, one queued): blocks spread evenly.
            compute=rd.ActorPoolStrategy(size=size.actors, max_tasks_in_flight_per_actor=2), num_cpus=size.cpus,
            **({"num_gpus": size.gpus} if size.gpus else {}),
        )
        progress = _Progress(total, exact, every_s=progress_every_s)
        reasons: Counter[str] = Counter()
        nodes: Counter[str] = Counter()
        first_out = None
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            first_out = first_out or time.monotonic()
            n = table.num_rows
            rejected = [(f, r, why) for f, r, why in zip(table.column("_file").to_pylist(),
                                                         table.column("_row").to_pylist(),
                                                         table.column(REASON).to_pylist()) if why is not None]
            for f, r, why in rejected:
                reasons[reason_kind(why)] += 1
                if len(result.first_rejected) < _FIRST_REJECTS:
                    result.first_rejected.append(f"{Path(files[f]).name} row {r}: {why}")
            result.rows_rejected += len(rejected)
            result.rows_truncated += sum(table.column("_truncated").to_pylist())
            for node, count in Counter(table.column("_node").to_pylist()).items():
                nodes[node] += count
            source = [files[f] for f in table.column("_file").to_pylist()] if len(files) > 1 else None
            keep = [c for c in table.column_names if c not in (*_HIDDEN, *_SCORER_HIDDEN)]
            table = table.select(keep)
            table = table.append_column("row_id", pa.array(range(result.rows_read, result.rows_read + n), pa.int64()))
            if source is not None:
                table = table.append_column("source_file", pa.array(source, pa.string()))
            table = table.append_column("model_name", pa.array([result.model_name] * n, pa.string()))
            table = table.append_column("model_version", pa.array([result.model_version] * n, pa.string()))
            writer.write(table)
            result.rows_read += n
            progress.update(result.rows_read)
        if result.rows_read == 0:
            raise DataError(f"--input {input}: no rows to score")
        writer.commit()
        result.scoring_s = time.monotonic() - (first_out or t0)
    except BaseException as exc:
        writer.abort()
        user = _user_error(exc) if not isinstance(exc, RaypipeError) else None
        if user is not None:
            raise user from None
        raise
    finally:
        (ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.execution_options.verbose_progress,
         ctx.wait_for_min_actors_s) = saved
        quiet.setLevel(level)
    result.rows_scored = result.rows_read - result.rows_rejected
    result.reasons = dict(reasons)
    result.rows_per_node = dict(nodes)
    result.wall_s = time.monotonic() - t0
    progress.update(result.rows_read, final=True)
    if log_run:
        from raypipe.tracking import log_batch_prediction

        result.mlflow_run_id = log_batch_prediction(cfg, result)
    print(result.summary(), flush=True)
    return result
