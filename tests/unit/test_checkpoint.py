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
