"""The validated readers stream through Ray Data and drop exactly the rows the report listed."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import RowCheck, read_dataset
from pipeline.errors import DataError


def rows(n):
    return [
        {
            "prompt": f"veli ka p{i} ?",
            "chosen": f" c{i} .",
            "rejected": f" r{i} .",
            "split": "test" if i % 4 == 0 else "train",
        }
        for i in range(n)
    ]


def check(kind="preferences"):
    return RowCheck(kind, tokenizer_dir=None, max_prompt_tokens=64, max_response_tokens=64)


def test_parquet_streams_clean_rows(local_ray, tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows(3000)), path)
    ds, report = read_dataset(path, check(), on_bad_rows="error")
    assert report.rows == 3000
    got = ds.take_all()
    assert len(got) == 3000 and got[1] == rows(3000)[1]


def test_split_keeps_one_split(local_ray, tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows(40)), path)
    ds, _ = read_dataset(path, check(), on_bad_rows="error", split="test")
    assert sorted(r["prompt"] for r in ds.take_all()) == sorted(r["prompt"] for r in rows(40)[::4])


def test_skip_drops_exactly_the_reported_rows(local_ray, tmp_path):
    data = rows(20)
    data[3]["chosen"] = ""
    data[11]["rejected"] = None
    lines = [json.dumps(r).encode() + b"\n" for r in data]
    lines[15] = b"\xff\xfe\n"
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(lines))
    logged = []
    ds, report = read_dataset(path, check(), on_bad_rows="skip", log=logged.append)
    assert [b.row for b in report.bad] == [3, 11, 15]
    assert len(logged) == 4
    kept = {r["prompt"] for r in ds.take_all()}
    assert kept == {r["prompt"] for i, r in enumerate(data) if i not in (3, 11, 15)}


def test_error_mode_stops_before_any_work(local_ray, tmp_path):
    data = rows(10)
    data[7]["chosen"] = ""
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(data), path)
    with pytest.raises(DataError, match="row 7: chosen is empty"):
        read_dataset(path, check(), on_bad_rows="error")
