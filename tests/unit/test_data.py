"""Data validation: every kind of bad row is reported with file, row and reason (no Ray here)."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import RowCheck, check_file, enforce
from pipeline.errors import DataError
from tests.conftest import REPO


def prefs(n=10):
    return [{"prompt": f"veli ka p{i} ?", "chosen": f" good {i} .", "rejected": f" bad {i} ."} for i in range(n)]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def check(kind="preferences", tokenizer_dir=None, max_prompt=64, max_response=64):
    return RowCheck(kind, tokenizer_dir=tokenizer_dir, max_prompt_tokens=max_prompt, max_response_tokens=max_response)


def test_clean_file_has_no_bad_rows(tmp_path):
    report = check_file(write_parquet(tmp_path / "p.parquet", prefs()), check())
    assert (report.rows, report.good_rows, report.bad, report.duplicates) == (10, 10, [], [])
    assert report.length_stats()["prompt"]["max"] == 4  # whitespace words without a tokenizer


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_row_7_with_empty_chosen_is_named(tmp_path, fmt):
    rows = prefs()
    rows[7]["chosen"] = ""
    path = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"p.{fmt}", rows)
    report = check_file(path, check())
    assert [(b.row, b.reason) for b in report.bad] == [(7, "chosen is empty")]
    with pytest.raises(DataError) as info:
        enforce(report, "error")
    assert f"{path}: row 7" in str(info.value)


def test_cli_data_check_exits_2_naming_file_and_row(tmp_path):
    rows = prefs()
    rows[7]["chosen"] = ""
    path = write_parquet(tmp_path / "prefs.parquet", rows)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "data", "check", str(path), "--kind", "preferences"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"{path}: row 7: chosen is empty" in proc.stderr
    assert "10 rows of preferences, 9 good, 1 bad" in proc.stdout


def test_cli_data_check_ok_with_token_stats(task_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "data",
            "check",
            str(task_dir / "demos.parquet"),
            "--kind",
            "demos",
            "--tokenizer",
            str(task_dir / "models/policy"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "response  tokens: min" in proc.stdout


def test_every_kind_of_bad_row_in_jsonl(tmp_path):
    good = {"prompt": "p", "response": " r"}
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            good,  # row 0
            {"prompt": "p"},  # row 1: missing column
            {"prompt": None, "response": " r"},  # row 2: null
            {"prompt": 3, "response": " r"},  # row 3: wrong type
            {"prompt": "  ", "response": " r"},  # row 4: empty
            b"\xff\xfe not utf-8\n",  # row 5
            b"{not json\n",  # row 6
            b"\n",  # blank line: not a row
            [1, 2],  # row 7: not an object
            {"prompt": "p", "response": " r", "split": "dev"},  # row 8: bad split
            good,  # row 9: duplicate of row 0, reported, not bad
        ],
    )
    report = check_file(path, check("demos"))
    reasons = {b.row: b.reason for b in report.bad}
    assert reasons == {
        1: "missing column 'response'",
        2: "prompt is null",
        3: "prompt has type int; expected a string or a messages list",
        4: "prompt is empty",
        5: "not valid UTF-8 (byte 0)",
        6: "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        7: "expected a JSON object, got list",
        8: "split is 'dev'; expected one of train, test",
    }
    assert report.bad[6].line == 9  # the blank line 8 is skipped in row numbering, not in line numbering
    assert report.rows == 10 and report.duplicates == [(9, 0)]


def test_skip_mode_reports_every_dropped_row(tmp_path):
    rows = prefs()
    rows[2]["rejected"] = None
    rows[5]["prompt"] = ""
    report = check_file(write_parquet(tmp_path / "p.parquet", rows), check())
    logged = []
    enforce(report, "skip", log=logged.append)
    assert "skipping 2 of 10 rows" in logged[0]
    assert "row 2: rejected is null" in logged[1] and "row 5: prompt is empty" in logged[2]


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    rows = [{"prompt": "", "chosen": "a", "rejected": "b"}] * 3
    report = check_file(write_parquet(tmp_path / "p.parquet", rows), check())
    with pytest.raises(DataError, match="all 3 rows are bad"):
        enforce(report, "skip")


def test_over_length_is_measured_in_tokens(tmp_path, task_dir):
    rows = prefs(3)
    rows[1]["chosen"] = " ka" * 40  # one token per " ka"
    path = write_parquet(tmp_path / "p.parquet", rows)
    report = check_file(path, check(tokenizer_dir=task_dir / "models/policy", max_response=32))
    assert [(b.row, b.reason) for b in report.bad] == [(1, "chosen has 40 tokens; the limit is 32")]


def _empty_parquet(d):
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    pq.write_table(schema.empty_table(), d / "e.parquet")
    return d / "e.parquet"


def _truncated_parquet(d):
    full = write_parquet(d / "full.parquet", prefs(100))
    cut = d / "cut.parquet"
    cut.write_bytes(full.read_bytes()[:-200])
    return cut


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.parquet", "no such file"),
        (_empty_parquet, "has zero rows"),
        (lambda d: write_jsonl(d / "e.jsonl", []), "has zero rows"),
        (lambda d: _truncated_parquet(d), "cannot read as Parquet"),
        (
            lambda d: write_parquet(d / "m.parquet", [{"prompt": "p", "chosen": "c"}] * 2),
            "missing column 'rejected'",
        ),
        (lambda d: (d / "x.csv").write_text("a,b\n") and d / "x.csv", "unknown file type '.csv'"),
    ],
)
def test_file_level_problems(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        check_file(path, check())
    assert message in str(info.value) and str(path) in str(info.value)


def test_chat_messages_are_rendered_with_the_template(tmp_path, task_dir):
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(task_dir / "models/policy")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(tok_dir)
    rows = [
        {"messages": [{"role": "user", "content": "veli ka ?"}, {"role": "assistant", "content": " ka ."}]},
        {"messages": [{"role": "assistant", "content": ""}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    rc = check("demos", tokenizer_dir=tok_dir)
    assert rc(rows[0])[0] == {"prompt": "<user>veli ka ?<assistant>", "response": " ka ."}
    report = check_file(path, rc)
    assert [(b.row, b.reason) for b in report.bad] == [
        (1, "prompt: the conversation has no turn before the assistant's answer")
    ]
    no_template = check("demos", tokenizer_dir=task_dir / "models/policy")
    assert "no chat template" in no_template(rows[0])
