"""Every kind of bad input from issue 10, written to a real file and read through `raylign data check` (exit 2,
one line naming file, row and reason) and through `enforce` in both `data.on_bad_rows` modes. The same cases go
through the Ray Data reader in tests/integration/test_data_ray.py."""

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.data import RowCheck, check_file, enforce
from pipeline.errors import DataError

BAD_ROW = 3
ROWS = 8


def prefs(n=ROWS) -> list[dict]:
    return [{"prompt": f"veli ka p{i} ?", "chosen": f" good {i} .", "rejected": f" bad {i} ."} for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join(x if isinstance(x, bytes) else (json.dumps(x) + "\n").encode() for x in lines))
    return path


def with_bad_row(**change) -> list[dict]:
    rows = prefs()
    rows[BAD_ROW] = {k: v for k, v in {**rows[BAD_ROW], **change}.items() if v is not ...}
    return rows


def non_utf8(d: Path) -> Path:
    lines: list = prefs()
    lines[BAD_ROW] = b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n'  # Latin-1, not UTF-8
    return write_jsonl(d / "p.jsonl", lines)


def truncated_parquet(d: Path) -> Path:
    """A copy cut off mid-write: the footer (schema, row groups) is gone."""
    full = write_parquet(d / "full.parquet", prefs(500))
    cut = d / "cut.parquet"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return cut


def corrupt_parquet_pages(d: Path) -> Path:
    """The footer is intact but the page headers of the third row group (rows 200-299) are overwritten."""
    full = d / "full.parquet"
    pq.write_table(pa.Table.from_pylist(prefs(500)), full, row_group_size=100)
    column = pq.ParquetFile(full).metadata.row_group(2).column(0)
    data = bytearray(full.read_bytes())
    start = column.data_page_offset
    data[start : start + 64] = bytes(64)
    bad = d / "bad.parquet"
    bad.write_bytes(bytes(data))
    return bad


def zero_rows_parquet(d: Path) -> Path:
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    pq.write_table(schema.empty_table(), d / "empty.parquet")
    return d / "empty.parquet"


@dataclass(frozen=True)
class RowCase:
    """A file whose row BAD_ROW is bad for `reason`; the other rows are good."""

    make: object  # dir -> path
    reason: str
    line: int | None = None  # JSONL: the 1-based line of the bad row


ROW_CASES = {
    "missing-column": RowCase(
        lambda d: write_jsonl(d / "p.jsonl", with_bad_row(rejected=...)), "missing column 'rejected'", line=BAD_ROW + 1
    ),
    "wrong-type": RowCase(
        lambda d: write_jsonl(d / "p.jsonl", with_bad_row(chosen=5)),
        "chosen has type int; expected a string or a messages list",
        line=BAD_ROW + 1,
    ),
    "null": RowCase(lambda d: write_parquet(d / "p.parquet", with_bad_row(rejected=None)), "rejected is null"),
    "empty-string": RowCase(lambda d: write_parquet(d / "p.parquet", with_bad_row(prompt="")), "prompt is empty"),
    "blank-string": RowCase(lambda d: write_parquet(d / "p.parquet", with_bad_row(chosen=" \n\t")), "chosen is empty"),
    # one token per " ka" with the task's tokenizer, plus BOS on a prompt: 41 tokens against a limit of 32
    "prompt-too-long": RowCase(
        lambda d: write_parquet(d / "p.parquet", with_bad_row(prompt=" ka" * 40)),
        "prompt has 41 tokens; the limit is 32",
    ),
    "non-utf8": RowCase(non_utf8, "not valid UTF-8 (byte 15)", line=BAD_ROW + 1),
    "not-json": RowCase(
        lambda d: write_jsonl(d / "p.jsonl", prefs()[:BAD_ROW] + [b'{"prompt": "a",\n'] + prefs()[BAD_ROW + 1 :]),
        "not valid JSON (Expecting property name enclosed in double quotes at column 16)",
        line=BAD_ROW + 1,
    ),
}

FILE_CASES = {
    "no-such-path": (lambda d: d / "nowhere" / "prompts.parquet", "no such file"),
    "a-directory": (lambda d: d, "not a file"),
    "truncated-parquet": (truncated_parquet, "cannot read as Parquet (truncated or not Parquet?)"),
    "corrupt-parquet-pages": (corrupt_parquet_pages, "row 200: unreadable from here on (truncated or corrupt"),
    "zero-rows-parquet": (zero_rows_parquet, "has zero rows"),
    "zero-rows-jsonl": (lambda d: write_jsonl(d / "e.jsonl", [b"\n", b"  \n"]), "has zero rows"),
    "missing-column-parquet": (
        lambda d: write_parquet(d / "m.parquet", [{"prompt": "p", "chosen": " c"}] * 3),
        "missing column 'rejected'; preferences need prompt, chosen, rejected (the file has: chosen, prompt)",
    ),
    "wrong-type-column": (
        lambda d: write_parquet(d / "t.parquet", [{"prompt": i, "chosen": " c", "rejected": " r"} for i in range(3)]),
        "row 0: prompt has type int",
    ),
}


def row_check(tokenizer_dir=None) -> RowCheck:
    return RowCheck("preferences", tokenizer_dir=tokenizer_dir, max_prompt_tokens=32, max_response_tokens=32)


def tokenizer_for(case_id: str, task_dir: Path) -> Path | None:
    return task_dir / "models/policy" if case_id == "prompt-too-long" else None


def data_check(capsys, path: Path, tokenizer: Path | None = None) -> tuple[int, str, str]:
    argv = ["data", "check", str(path), "--kind", "preferences", "--max-prompt-tokens", "32"]
    code = main(argv + (["--tokenizer", str(tokenizer)] if tokenizer else []))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case_id", ROW_CASES)
def test_data_check_names_file_row_and_reason(tmp_path, task_dir, capsys, case_id):
    case = ROW_CASES[case_id]
    path = case.make(tmp_path)
    code, out, err = data_check(capsys, path, tokenizer_for(case_id, task_dir))
    assert code == 2
    where = f"row {BAD_ROW}" + (f" (line {case.line})" if case.line else "")
    assert err.splitlines() == [f"{path}: {where}: {case.reason}"]
    assert f"{ROWS} rows of preferences, {ROWS - 1} good, 1 bad" in out


@pytest.mark.parametrize("case_id", ROW_CASES)
def test_error_mode_stops_and_skip_mode_drops_and_counts(tmp_path, task_dir, case_id):
    case = ROW_CASES[case_id]
    path = case.make(tmp_path)
    report = check_file(path, row_check(tokenizer_for(case_id, task_dir)))
    with pytest.raises(DataError) as info:
        enforce(report, "error", log=lambda _: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: row {BAD_ROW}") and case.reason in message
    logged: list[str] = []
    enforce(report, "skip", log=logged.append)
    assert report.good_rows == ROWS - 1
    assert logged[0].startswith(f"data: skipping 1 of {ROWS} rows of {path}")
    assert len(logged) == 2 and f"row {BAD_ROW}" in logged[1] and case.reason in logged[1]


@pytest.mark.parametrize("case_id", FILE_CASES)
def test_file_level_faults_exit_2_with_one_line(tmp_path, capsys, case_id):
    make, says = FILE_CASES[case_id]
    path = make(tmp_path)
    code, out, err = data_check(capsys, path)
    assert code == 2
    if case_id == "wrong-type-column":  # every row is bad: each is listed
        assert err.splitlines()[0] == f"{path}: row 0: prompt has type int; expected a string or a messages list"
        assert len(err.splitlines()) == 3
        return
    assert err.splitlines() == [err.strip()] and err.startswith(f"raylign: error: {path}: ")
    assert says in err


def test_a_file_of_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
    report = check_file(FILE_CASES["wrong-type-column"][0](tmp_path), row_check())
    with pytest.raises(DataError, match="all 3 rows are bad; first: .*row 0: prompt has type int"):
        enforce(report, "skip", log=lambda _: None)


def test_duplicates_are_reported_not_dropped(tmp_path, capsys):
    rows = prefs()
    rows[5] = dict(rows[2])
    rows[7] = dict(rows[2])
    path = write_parquet(tmp_path / "p.parquet", rows)
    code, out, err = data_check(capsys, path)
    assert code == 0 and err == ""
    assert f"{ROWS} rows of preferences, {ROWS} good, 0 bad, 2 duplicates" in out
    assert f"{path}: row 5: duplicate of row 2" in out and f"{path}: row 7: duplicate of row 2" in out
    logged: list[str] = []
    report = check_file(path, row_check())
    enforce(report, "error", log=logged.append)  # duplicates alone do not stop a run ...
    assert report.good_rows == ROWS
    assert logged == [  # ... but a run says so
        f"data: {path}: 2 duplicate rows kept (row 5 repeats row 2; "
        f"`raylign data check {path} --kind preferences` lists them all)"
    ]


def test_the_driver_checks_a_file_once_per_version(tmp_path):
    """read_dataset's check (pipeline.data.checked) runs once per file version and check in a process: the same
    report for the same file, a new one once the file changed."""
    from pipeline.data import checked

    path = write_jsonl(tmp_path / "prefs.jsonl", prefs())
    check = RowCheck("preferences", tokenizer_dir=None, max_prompt_tokens=64, max_response_tokens=64)
    first = checked(path, check)
    assert checked(path, check) is first and first.good_rows == ROWS
    write_jsonl(path, with_bad_row(chosen=""))
    again = checked(path, check)
    assert again is not first and [b.row for b in again.bad] == [BAD_ROW]
