"""Prompts, demonstrations and preferences: validated readers on Ray Data.

One row check serves both paths: `check_file` runs it on the driver, streaming the file once, to report every
bad row (file, row, reason) before any work starts; `read_dataset` then streams the same file through Ray Data
with the same check, dropping exactly the rows the report listed (`data.on_bad_rows=skip`), so nothing is
dropped silently. Rows are numbered from 0, as pandas and pyarrow do; JSONL reports also give the 1-based line.

Columns are plain strings (`prompt`, `response`, `chosen`, `rejected`), or chat `messages` lists
(`[{"role": ..., "content": ...}]`) rendered with the tokenizer's chat template: a prompt as the conversation
with a generation prompt, a response as the content of its last assistant turn.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from pipeline.errors import DataError

Kind = Literal["prompts", "demos", "preferences"]
COLUMNS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "demos": ("prompt", "response"),
    "preferences": ("prompt", "chosen", "rejected"),
}
SPLITS = ("train", "test")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BATCH_ROWS = 1024


@dataclass(frozen=True)
class BadRow:
    row: int
    reason: str
    line: int | None = None

    def describe(self, path: Path | str) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{path}: {where}: {self.reason}"


@dataclass
class DataReport:
    path: Path
    kind: str
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, first row with the same values)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    length_unit: str = "tokens"
    splits: Counter[str | None] = field(default_factory=Counter)  # good rows by `split` (None: the row has none)

    @property
    def good_rows(self) -> int:
        return self.rows - len(self.bad)

    def rows_of_split(self, split: str) -> int:
        """The good rows that read_dataset(split=split) streams: that split's, and every row without a split."""
        return self.splits[split] + self.splits[None]

    def length_stats(self) -> dict[str, dict[str, float]]:
        out = {}
        for column, values in self.lengths.items():
            if values:
                ordered = sorted(values)
                out[column] = {
                    "min": ordered[0],
                    "mean": statistics.fmean(ordered),
                    "p50": ordered[len(ordered) // 2],
                    "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                    "max": ordered[-1],
                }
        return out


class RowCheck:
    """Turns one raw record into clean string columns, or says why it cannot.

    Token lengths are counted with the tokenizer in `tokenizer_dir` (prompt with special tokens, responses
    without); without one, lengths are whitespace words and no length limit applies."""

    def __init__(self, kind: str, *, tokenizer_dir: Path | None, max_prompt_tokens: int, max_response_tokens: int):
        if kind not in COLUMNS:
            raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(COLUMNS)}")
        self.kind = kind
        self.tokenizer_dir = tokenizer_dir
        self.limits = {c: (max_prompt_tokens if c == "prompt" else max_response_tokens) for c in COLUMNS[kind]}
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # loaded again where the check runs

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.tokenizer_dir is not None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot load a tokenizer from {self.tokenizer_dir}: {e}") from None
        return self._tokenizer

    def __call__(self, record: dict[str, Any]) -> tuple[dict[str, str], dict[str, int]] | str:
        """-> (clean row, token length per column), or the reason the record is bad."""
        row = self.clean(record)
        if isinstance(row, str):
            return row
        lengths = {c: self._length(c, row[c]) for c in COLUMNS[self.kind]}
        if self.tokenizer is not None:
            for column, n in lengths.items():
                if n > self.limits[column]:
                    return f"{column} has {n} tokens; the limit is {self.limits[column]}"
        return row, lengths

    def clean(self, record: dict[str, Any]) -> dict[str, str] | str:
        """-> the clean string columns (and split) of a record, or the reason it is bad; lengths unchecked."""
        row: dict[str, str] = {}
        for column in COLUMNS[self.kind]:
            value = record.get(column)
            if value is None and column == "prompt" and "messages" in record:
                value = record["messages"]
            if value is None and column == "response" and "messages" in record:
                value = record["messages"]
            text = self._text(column, value, column in record or "messages" in record)
            if not isinstance(text, tuple):
                return text
            row[column] = text[0]
        if "split" in record and record["split"] is not None:
            if record["split"] not in SPLITS:
                return f"split is {record['split']!r}; expected one of {', '.join(SPLITS)}"
            row["split"] = record["split"]
        return row

    def _text(self, column: str, value: Any, present: bool) -> tuple[str] | str:
        if not present:
            return f"missing column {column!r}"
        if value is None:
            return f"{column} is null"
        if isinstance(value, list):
            return self._render(column, value)
        if not isinstance(value, str):
            return f"{column} has type {type(value).__name__}; expected a string or a messages list"
        if not value.strip():
            return f"{column} is empty"
        return (value,)

    def _render(self, column: str, messages: list[Any]) -> tuple[str] | str:
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            return f"{column}: a messages list needs one or more {{role, content}} string pairs"
        if column != "prompt":
            last = messages[-1]
            if last["role"] != "assistant" or not last["content"].strip():
                return f"{column}: the last message must be a non-empty assistant turn"
            return (last["content"],)
        if self.kind == "demos" and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a demo conversation: the prompt is everything before the answer
            if not messages:
                return f"{column}: the conversation has no turn before the assistant's answer"
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return f"{column} is a messages list, but the tokenizer has no chat template to render it"
        return (self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),)

    def _length(self, column: str, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=column == "prompt")["input_ids"])


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise DataError(f"{path}: unknown file type {suffix!r}; expected Parquet (.parquet) or JSONL (.jsonl)")


def iter_records(path: Path, kind: str) -> Iterator[tuple[int, int | None, dict[str, Any] | str]]:
    """Stream (row, line, record or reason) from a Parquet or JSONL file, holding one batch at a time."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if file_format(path) == "parquet":
        yield from _parquet_records(path, kind)
    else:
        yield from _jsonl_records(path)


def _parquet_records(path: Path, kind: str) -> Iterator[tuple[int, None, dict[str, Any]]]:
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet (truncated or not Parquet?): {_one_line(e)}") from None
    names = set(reader.schema_arrow.names)
    missing = [c for c in COLUMNS[kind] if c not in names and not (c in ("prompt", "response") and "messages" in names)]
    if missing:
        raise DataError(
            f"{path}: missing column {', '.join(map(repr, missing))}; {kind} need {', '.join(COLUMNS[kind])} "
            f"(the file has: {', '.join(sorted(names)) or 'no columns'})"
        )
    row = 0
    try:
        # one row group at a time, so a corrupt group is named by its first row (a batch may span groups)
        for group in range(reader.num_row_groups):
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                for record in batch.to_pylist():
                    yield row, None, record
                    row += 1
    except (pa.ArrowException, OSError) as e:
        # rows are decoded a batch at a time: `row` is the first row of the batch that failed
        raise DataError(
            f"{path}: row {row}: unreadable from here on (truncated or corrupt Parquet?): {_one_line(e)}"
        ) from None


def _one_line(error: Exception) -> str:
    """pyarrow's messages span lines; the CLI prints an error as one line."""
    return " ".join(str(error).split())


def _jsonl_records(path: Path) -> Iterator[tuple[int, int, dict[str, Any] | str]]:
    row = 0
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield row, line_no, f"not valid UTF-8 (byte {e.start})"
            else:
                try:
                    record = json.loads(text.rstrip("\r\n"))  # so an error's column lies on the line
                except json.JSONDecodeError as e:
                    yield row, line_no, f"not valid JSON ({e.msg} at column {e.colno})"
                else:
                    ok = isinstance(record, dict)
                    yield (
                        row,
                        line_no,
                        record if ok else f"expected a JSON object, got {type(record).__name__}",
                    )
            row += 1


def check_file(path: Path, check: RowCheck) -> DataReport:
    """Read the whole file once (streaming) and report row count, bad rows, duplicates and lengths."""
    path = Path(path)
    report = DataReport(path=path, kind=check.kind, length_unit="tokens" if check.tokenizer else "words")
    report.lengths = {c: [] for c in COLUMNS[check.kind]}
    first_seen: dict[bytes, int] = {}
    for row, line, record in iter_records(path, check.kind):
        report.rows += 1
        result = check(record) if isinstance(record, dict) else record
        if isinstance(result, str):
            report.bad.append(BadRow(row, result, line))
            continue
        clean, lengths = result
        report.splits[clean.get("split")] += 1
        for column, n in lengths.items():
            report.lengths[column].append(n)
        digest = hashlib.blake2b(json.dumps(clean, sort_keys=True).encode(), digest_size=16).digest()
        if digest in first_seen:
            report.duplicates.append((row, first_seen[digest]))
        else:
            first_seen[digest] = row
    if report.rows == 0:
        raise DataError(f"{path}: has zero rows; expected {check.kind} with columns {', '.join(COLUMNS[check.kind])}")
    return report


def enforce(report: DataReport, on_bad_rows: str, log=print) -> None:
    """Apply `data.on_bad_rows`: stop on any bad row (`error`), or report the dropped ones (`skip`). Duplicate
    rows are kept (a prompt may fairly appear twice) but reported, with the first pair."""
    if report.duplicates:
        row, first = report.duplicates[0]
        log(
            f"data: {report.path}: {len(report.duplicates)} duplicate rows kept (row {row} repeats row {first}; "
            f"`raylign data check {report.path} --kind {report.kind}` lists them all)"
        )
    if not report.bad:
        return
    first_bad = report.bad[0].describe(report.path)
    if on_bad_rows == "error":
        more = f" (and {len(report.bad) - 1} more bad rows)" if len(report.bad) > 1 else ""
        raise DataError(
            f"{first_bad}{more}; `raylign data check {report.path} --kind {report.kind}` lists them all, "
            "data.on_bad_rows=skip drops them"
        )
    if report.good_rows == 0:
        raise DataError(f"{report.path}: all {report.rows} rows are bad; first: {first_bad}")
    log(f"data: skipping {len(report.bad)} of {report.rows} rows of {report.path} (data.on_bad_rows=skip):")
    for bad in report.bad:
        log(f"  {bad.describe(report.path)}")


class _CheckedRows(FileBasedDatasource):
    """Ray Data source: each file is read by one task, in order, leaving out exactly the rows that `check_file`'s
    report listed as bad (by row number), the others cleaned as it cleaned them. Their lengths were checked there:
    the stream does not tokenize them again."""

    def __init__(self, path: Path, check: RowCheck, split: str | None, bad_rows: frozenset[int]):
        super().__init__(str(path))
        self._check = check
        self._split = split
        self._bad_rows = bad_rows

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        f.close()  # iter_records opens the file itself: one reader for both formats
        rows: list[dict[str, str]] = []
        for number, _, record in iter_records(Path(path), self._check.kind):
            if number in self._bad_rows:
                continue
            row = self._check.clean(record) if isinstance(record, dict) else record
            if isinstance(row, str):  # the file changed since its check
                raise DataError(f"{path}: row {number} is bad ({row}) but passed the check of this run's start")
            if self._split and row.get("split", self._split) != self._split:
                continue
            rows.append(row)
            if len(rows) == BATCH_ROWS:
                yield pa.Table.from_pylist(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows)


_REPORTS: dict[tuple, DataReport] = {}  # checked(): this process's reports, by file version and check


def checked(path: Path, check: RowCheck) -> DataReport:
    """`check_file`'s report, made once per file version (path, size, modification time) and check in this process:
    a run's stages read the same files several times (train and test splits, eval), and a check tokenizes every
    row."""
    path = Path(path)
    if not path.is_file():
        return check_file(path, check)  # its error names the problem
    stat = path.stat()
    limits = tuple(sorted(check.limits.items()))
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, check.kind, str(check.tokenizer_dir), limits)
    if key not in _REPORTS:
        _REPORTS[key] = check_file(path, check)
    return _REPORTS[key]


def read_dataset(
    path: Path, check: RowCheck, *, on_bad_rows: str, split: str | None = None, log=print
) -> tuple[ray.data.Dataset, DataReport]:
    """Validate `path` (exit 2 on bad rows unless skipping), then stream its clean rows as a Ray Dataset.

    `split` keeps the rows of one split when the file has a `split` column (all rows when it has none)."""
    report = checked(path, check)
    enforce(report, on_bad_rows, log)
    bad_rows = frozenset(b.row for b in report.bad)
    return ray.data.read_datasource(_CheckedRows(Path(path).resolve(), check, split, bad_rows)), report
