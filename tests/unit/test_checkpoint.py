import json

from pipeline import checkpoint


def write_blob(text):
    def write(d):
        (d / "learner").mkdir()
        (d / "learner" / "weights.bin").write_text(text)

    return write


def test_save_and_load_latest(tmp_path):
    checkpoint.save(tmp_path, 5, {"rng": [1, 2]}, write_blob("a"))
    path = checkpoint.save(tmp_path, 10, {"rng": [3]}, write_blob("b"))
    assert checkpoint.latest(tmp_path) == path
    assert checkpoint.load_state(path) == {"step": 10, "rng": [3]}
    assert (path / "learner" / "weights.bin").read_text() == "b"


def test_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, {}, keep=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-000003", "step-000004"]


def test_a_checkpoint_cut_off_mid_write_is_never_loaded(tmp_path):
    good = checkpoint.save(tmp_path, 1, {}, write_blob("a"))
    # a crash before the rename leaves only a temp dir
    (tmp_path / ".tmp-step-000002").mkdir()
    assert checkpoint.latest(tmp_path) == good
    # a sealed dir whose file was truncated afterwards fails its checksum
    bad = checkpoint.save(tmp_path, 3, {}, write_blob("abcdef"))
    (bad / "learner" / "weights.bin").write_text("abc")
    assert checkpoint.latest(tmp_path) == good
    # a file missing from the manifest, or an unreadable manifest
    (bad / "learner" / "weights.bin").write_text("abcdef")
    assert checkpoint.latest(tmp_path) == bad
    (bad / "extra").write_text("x")
    assert not checkpoint.verify(bad)
    (bad / "extra").unlink()
    (bad / checkpoint.MANIFEST).write_text("{not json")
    assert checkpoint.latest(tmp_path) == good


def test_manifest_lists_every_file(tmp_path):
    path = checkpoint.save(tmp_path, 7, {"a": 1}, write_blob("x"))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert set(manifest) == {"state.json", "learner/weights.bin"}


def test_a_writer_killed_mid_write_leaves_nothing_that_loads(tmp_path):
    """What SIGKILL can leave behind at each point of `save`, and what `latest` then picks."""
    good = checkpoint.save(tmp_path, 1, {"rng": [1]}, write_blob("a" * 1000), keep=5)
    # killed while `write` ran: a temp dir with part of a file, no manifest
    tmp = tmp_path / ".tmp-step-000002"
    (tmp / "learner").mkdir(parents=True)
    (tmp / "learner" / "weights.bin").write_text("a" * 10)
    # a sealed dir whose file was cut short after the manifest was written (e.g. a copy killed half-way)
    cut = checkpoint.save(tmp_path, 3, {"rng": [3]}, write_blob("b" * 1000), keep=5)
    with (cut / "learner" / "weights.bin").open("r+") as f:
        f.truncate(500)
    # a sealed dir whose manifest itself was cut off
    checkpoint.save(tmp_path, 4, {}, write_blob("c"), keep=5)
    manifest = tmp_path / "step-000004" / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text()[:20])
    skipped = []
    assert checkpoint.latest(tmp_path, log=skipped.append) == good
    assert checkpoint.load_state(good) == {"step": 1, "rng": [1]}
    assert skipped == [
        f"checkpoint: skipping {tmp_path / 'step-000004'}: unreadable manifest",
        f"checkpoint: skipping {cut}: learner/weights.bin does not match its checksum "
        "(truncated or changed after it was written)",
    ]
    assert checkpoint.problem(good) is None
    # the resumed run saves step 2 again: the newer, broken dirs go (their steps run again), the good one stays
    checkpoint.save(tmp_path, 2, {"rng": [2]}, write_blob("d"), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000002"
    (good / "learner" / "weights.bin").unlink()
    assert checkpoint.problem(good).startswith("files differ from the manifest (missing: ['learner/weights.bin']")


def test_the_next_save_clears_temp_dirs_left_by_a_killed_writer(tmp_path):
    (tmp_path / ".tmp-step-000007" / "learner").mkdir(parents=True)
    checkpoint.save(tmp_path, 8, {}, write_blob("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000008"]
