"""The validated readers stream through Ray Data and drop exactly the rows the report listed."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import RowCheck, read_dataset
from pipeline.errors import DataError
from tests.unit import test_bad_data as bad_data
from tests.unit.test_bad_data import FILE_CASES, ROW_CASES


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


# --- issue 10's bad inputs through the reader a run uses (the cases of tests/unit/test_bad_data.py) ---


@pytest.mark.parametrize("case_id", ROW_CASES)
def test_reader_stops_on_a_bad_row_or_drops_exactly_it(local_ray, tmp_path, task_dir, case_id):
    case = ROW_CASES[case_id]
    path = case.make(tmp_path)
    rc = bad_data.row_check(bad_data.tokenizer_for(case_id, task_dir))
    with pytest.raises(DataError) as info:
        read_dataset(path, rc, on_bad_rows="error", log=lambda _: None)
    assert str(info.value).startswith(f"{path}: row {bad_data.BAD_ROW}") and case.reason in str(info.value)
    logged = []
    ds, report = read_dataset(path, rc, on_bad_rows="skip", log=logged.append)
    assert (report.rows, report.good_rows) == (bad_data.ROWS, bad_data.ROWS - 1)
    assert logged[0].startswith(f"data: skipping 1 of {bad_data.ROWS} rows")
    kept = sorted(r["prompt"] for r in ds.take_all())
    assert kept == sorted(r["prompt"] for i, r in enumerate(bad_data.prefs()) if i != bad_data.BAD_ROW)


@pytest.mark.parametrize("case_id", FILE_CASES)
def test_reader_refuses_a_bad_file_in_both_modes(local_ray, tmp_path, case_id):
    make, says = FILE_CASES[case_id]
    path = make(tmp_path)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            read_dataset(path, bad_data.row_check(), on_bad_rows=mode, log=lambda _: None)
        assert str(path) in str(info.value) and (
            "all 3 rows are bad" if case_id == "wrong-type-column" and mode == "skip" else says
        ) in str(info.value)


RAY_DATA_THREADS = ("iter_threaded", "Prefetcher", "prompt-stream")


def ray_data_threads() -> list[str]:
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith(RAY_DATA_THREADS))


def test_prompt_stream_serves_seeded_epochs_resumes_mid_epoch_and_leaves_no_read_behind(
    local_ray, task_dir, tmp_path, request
):
    import gc
    import time

    from pipeline.config import load_config
    from pipeline.rl import PromptStream
    from pipeline.stages.context import Artifacts, StageContext

    cfg = load_config(
        None,
        [
            f"data.prompts={task_dir / 'prompts.parquet'}",
            f"model.policy={task_dir / 'models/policy'}",
            f"run.output_dir={tmp_path}",
        ],
    )
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, artifacts=Artifacts(), log=lambda _: None)
    table = pq.read_table(task_dir / "prompts.parquet").to_pylist()
    train = {r["prompt"] for r in table if r["split"] == "train"}
    test = [r["prompt"] for r in table if r["split"] == "test"]
    per_epoch = len(train) // 16  # 56 train prompts: 3 batches of 16 an epoch, 8 dropped
    before = ray_data_threads()
    gc.disable()  # a read left half-done ends only when the collector finalizes it: that must not be needed
    request.addfinalizer(gc.enable)

    stream = PromptStream(ctx, batch_size=16, seed=0)
    stream.start(0, 0)
    got, positions = [], []
    for _ in range(per_epoch + 2):
        got.append(stream.next())
        positions.append(stream.position())
    assert positions == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    epoch0 = [p for batch in got[:per_epoch] for p in batch]
    assert len(set(epoch0)) == 16 * per_epoch and set(epoch0) <= train  # no prompt twice in an epoch
    assert got[per_epoch] != got[0]  # the next epoch is reshuffled
    stream.start(1, 1)  # a resume from the checkpoint position after the 4th batch
    assert stream.next() == got[per_epoch + 1] and stream.position() == (1, 2)
    assert stream.heldout(4) == test[:4]
    stream.close()

    # every Ray Data read ran to its end: none is left for garbage collection to finalize after ray.shutdown()
    deadline = time.monotonic() + 10
    while ray_data_threads() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_data_threads() == before


def test_ray_workers_run_ray_data_with_raylign_s_executor_poll(local_ray):
    """The worker hook reaches Ray's worker processes (Ray Data's executor runs in one: the split coordinator)."""
    from pipeline.ray_hooks import RAY_DATA_POLL_S

    @local_ray.remote(num_cpus=0)
    def poll() -> float:
        from ray.data._internal.execution import streaming_executor_state

        return streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S

    assert local_ray.get(poll.remote()) == RAY_DATA_POLL_S
