"""Progress within an epoch of the offline stages: the update count per epoch and the line a user sees."""

from pipeline.progress import format_seconds
from pipeline.stages.offline import describe_progress, updates_per_epoch


def test_updates_per_epoch_count_the_last_partial_batch_of_each_equal_shard():
    # 1,024 demos, batches of 32 on one rank: 32 updates; on 2 ranks each takes 512 rows in batches of 16: 32
    assert updates_per_epoch(1024, 32, 1) == 32
    assert updates_per_epoch(1024, 32, 2) == 32
    # 1,000 rows, batches of 64: 15 full + 1 partial; 2 ranks: 500 rows each in batches of 32: 15 + 1
    assert updates_per_epoch(1000, 64, 1) == 16
    assert updates_per_epoch(1000, 64, 2) == 16
    assert updates_per_epoch(5, 64, 1) == 1


def test_a_progress_line_gives_done_total_rate_and_eta():
    record = {
        "kind": "progress",
        "stage": "reward",
        "member": 0,
        "epoch": 1,
        "epochs": 2,
        "updates": 120,
        "of": 2560,
        "rate": 2.0,
        "loss/bt": 0.65123,
        "grad_norm": 1.0,
    }
    # 2 updates per second over the last interval; 2,440 left: 1,220 s = 20 min 20 s
    assert describe_progress(record) == (
        "reward: member 0 epoch 1/2 update 120/2560 (5%) eta 20m 20s 2.00 updates/s loss/bt 0.6512"
    )


def test_a_progress_line_without_a_total_gives_the_count_and_rate():
    record = {
        "kind": "progress",
        "stage": "sft",
        "member": 0,
        "epoch": 1,
        "epochs": 1,
        "updates": 10,
        "of": None,
        "rate": 2.5,
    }
    assert describe_progress(record) == "sft: epoch 1/1 update 10 2.50 updates/s"


def test_seconds_read_as_minutes_and_seconds():
    assert format_seconds(59.4) == "59s"
    assert format_seconds(61) == "1m 01s"


def test_the_first_update_line_has_no_rate_yet():
    record = {"kind": "progress", "stage": "sft", "member": 0, "epoch": 1, "epochs": 4, "updates": 1, "of": 28}
    assert (
        describe_progress({**record, "rate": None, "loss/sft": 6.5})
        == "sft: epoch 1/4 update 1/28 (4%) loss/sft 6.5000"
    )


def test_the_file_check_counts_the_rows_each_split_streams(tmp_path):
    """What fit uses in place of counting a dataset: the train split's rows plus the rows that name no split."""
    import json

    from pipeline.data import RowCheck, check_file

    rows = [{"prompt": f"p{i}", "response": "r", "split": s} for i, s in enumerate(["train"] * 3 + ["test"] * 2)]
    rows += [{"prompt": "q", "response": "r"}, {"prompt": "", "response": "r", "split": "train"}]  # no split; bad
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_file(path, RowCheck("demos", tokenizer_dir=None, max_prompt_tokens=64, max_response_tokens=64))
    assert (report.rows, report.good_rows) == (7, 6)
    assert report.rows_of_split("train") == 4 and report.rows_of_split("test") == 3
