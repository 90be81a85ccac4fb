"""benchmarks/gpu_learner.py in its tiny CPU mode: both layouts are timed on the same real tokens, padding only adds
computed tokens, the numerics check passes on correct packing and fails on packing whose positions do not restart,
and the first-fit rule on a hand-computed case."""

import dataclasses
import json

import torch

from benchmarks import gpu_learner

TINY_CPU = ["--tiny", "--device", "cpu"]


def test_tiny_cpu_run_writes_both_layouts_with_equal_real_tokens(tmp_path):
    out = tmp_path / "result.json"
    gpu_learner.main([*TINY_CPU, "--out", str(out)])
    result = json.loads(out.read_text())
    padded, packed = result["paths"]["padded"], result["paths"]["packed"]
    assert result["check"]["passed"] and result["check"]["loss_abs_diff"] <= 1e-5
    assert padded["real_tokens_per_step"] == packed["real_tokens_per_step"] == result["workload"]["real_tokens"]
    assert packed["computed_tokens_per_step"] == packed["real_tokens_per_step"]
    assert padded["computed_tokens_per_step"] > packed["computed_tokens_per_step"]
    assert len(padded["step_s"]) == len(packed["step_s"]) == result["settings"]["steps"]
    assert 0 < packed["mfu"] and result["speedup_packed_over_padded"] > 0
    assert result["machine"]["torch"] == torch.__version__


def test_numerics_check_fails_when_packed_positions_do_not_restart():
    """With positions 0..T-1 over the whole row transformers sees one long sequence: the second sequence attends to
    the first, and the losses differ far beyond the fp32 tolerance."""
    args = gpu_learner.parse_args(TINY_CPU)
    base = gpu_learner.build_model(args)
    seqs = gpu_learner.draw_sequences(6, 8, 48, args.vocab, seed=1)
    padded, packed = gpu_learner.padded_batches(seqs, 4), gpu_learner.packed_batches(seqs, 128)
    cpu = torch.device("cpu")
    assert gpu_learner.numerics_check(base, padded, packed, "fp32", cpu, 1e-5)["passed"]
    unrestarted = [dataclasses.replace(mb, position_ids=torch.arange(mb.computed_tokens)[None]) for mb in packed]
    broken = gpu_learner.numerics_check(base, padded, unrestarted, "fp32", cpu, 1e-5)
    assert not broken["passed"] and broken["loss_abs_diff"] > 1e-4


def test_first_fit_places_the_longest_first_into_the_first_row_with_room():
    # lengths 5, 3, 4, 2 in a budget of 7: 5 opens row 0, 4 opens row 1, 3 joins row 1 (4+3), 2 joins row 0 (5+2)
    assert gpu_learner.first_fit([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
