"""Learner throughput on one GPU, packed against padded micro-batches: training tokens/s and model-FLOPs utilisation
(MFU) of AdamW steps on a randomly initialised Qwen2-shaped model (Qwen2.5-0.5B's shape by default; nothing is
downloaded) over one fixed-seed batch of sequences of mixed lengths.

Standalone by design: it imports torch and transformers only (no Ray, vLLM, DeepSpeed, nor raylign's `pipeline` /
`actors` / `cluster`), so it runs on a GPU machine that has just those two. Its packing is therefore its own small
copy of the learner's rule (actors/sequences.py): longest sequence first, each into the first row with room.

Rules:
- Workload: `--sequences` sequences, lengths uniform in [`--min-len`, `--max-len`], token ids uniform over the
  vocabulary, all from `--seed`. One optimizer step trains on every sequence: the loss is the causal-LM cross
  entropy summed over every next-token target (each sequence's tokens 1..L-1) and divided by the step's target
  count, accumulated over the step's micro-batches, so both layouts compute the same loss and gradient.
- Padded: micro-batches of `--padded-batch` sequences in drawn order, right-padded to the micro-batch's longest,
  with `attention_mask`. Packed: rows of at most `--pack-tokens` tokens (first-fit decreasing), one row per
  micro-batch, `position_ids` restarting at 0 per sequence, `attention_mask=None`, `use_cache=False`: transformers
  then masks attention block-diagonally from the position ids (sdpa: a dense mask over the row; flash_attention_2:
  variable-length kernels).
- Precision: `bf16` is fp32 weights and AdamW state with bf16 autocast (the default on cuda); `fp32` (the default
  on cpu) is autocast off.
- Numerics check, before any timing: on the first `--check-sequences` sequences, one backward pass per layout
  from the same weights; it passes when |loss_padded - loss_packed| and the relative difference of the gradient
  norms are both at most `--tol` (default 1e-2 in bf16, 1e-5 in fp32). A failed check writes the results file
  and exits non-zero before timing.
- Timing: per layout, a fresh copy of the initial weights and a fresh AdamW, `--warmup` steps, then `--steps`
  timed steps, each between two `torch.cuda.synchronize()`; step seconds is the median. Real tokens are the
  sequences' tokens; computed tokens are what the forwards processed (padding included). Peak memory is
  `torch.cuda.max_memory_allocated` over that layout's steps (none on cpu).
- MFU = model FLOPs per step / median step seconds / (`--peak-tflops` * 1e12), counting only real tokens
  (PaLM, Chowdhery et al. 2022, appendix B): 6 * N * real tokens for the weight matmuls forward and backward, plus
  12 * layers * hidden * s^2 per sequence of s tokens for attention scores and values (not halved for the causal
  mask). N is every parameter that enters a matmul: all of them with tied embeddings (the embedding is the LM
  head), all but the input embedding otherwise. The `--peak-tflops` default, 989, is an H200's dense bf16 peak
  (NVIDIA's H200 datasheet, without sparsity); give the peak of any other device.

    python benchmarks/gpu_learner.py [--out FILE] [--attn flash_attention_2]
    python benchmarks/gpu_learner.py --tiny --device cpu    # harness check in seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

RESULTS = Path(__file__).resolve().parent / "results"
H200_BF16_DENSE_TFLOPS = 989.0
TOLERANCE = {"bf16": 1e-2, "fp32": 1e-5}
IGNORE = -100  # label of a position without a next-token target (padding, each sequence's last token)
# --tiny changes only the defaults below; flags given explicitly still win.
TINY = dict(
    layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, sequences=12, min_len=8, max_len=48,
    padded_batch=4, pack_tokens=128, check_sequences=6, warmup=1, steps=2,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One forward's tensors. input_ids, labels: [R, T] (R rows of T tokens; labels are the next token or IGNORE).
    attention_mask: [R, T] (padded) or None (packed). position_ids: [R, T] restarting at 0 at each sequence
    (packed) or None (padded: 0..T-1). real_tokens: the sequences' tokens, padding excluded."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    real_tokens: int

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> MicroBatch:
        move = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return MicroBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in move.items()})


def draw_sequences(count: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """count sequences of token ids [L], L uniform in [min_len, max_len], ids uniform in [0, vocab)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g) for n in lengths]


def next_tokens(seq: torch.Tensor) -> torch.Tensor:
    """Labels [L] of one sequence [L]: token t+1 at position t; the last position has no target."""
    return torch.cat([seq[1:], torch.tensor([IGNORE])])


def padded_batches(seqs: list[torch.Tensor], per_batch: int) -> list[MicroBatch]:
    """Groups of per_batch sequences in order, each right-padded (token 0, label IGNORE) to its longest."""
    out = []
    for i in range(0, len(seqs), per_batch):
        group = seqs[i : i + per_batch]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, : len(s)], labels[row, : len(s)], mask[row, : len(s)] = s, next_tokens(s), 1
        out.append(MicroBatch(ids, labels, mask, None, sum(len(s) for s in group)))
    return out


def first_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """Rows of sequence indices, each summing to at most budget: longest first, each into the first row with
    room, a new row when none has. Raises when a sequence is longer than the budget."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > budget:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit in a row of {budget}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(budget)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def packed_batches(seqs: list[torch.Tensor], budget: int) -> list[MicroBatch]:
    """One row per micro-batch, the sequences of a first_fit row concatenated, positions restarting at 0."""
    out = []
    for row in first_fit([len(s) for s in seqs], budget):
        group = [seqs[i] for i in row]
        ids = torch.cat(group)[None]
        labels = torch.cat([next_tokens(s) for s in group])[None]
        positions = torch.cat([torch.arange(len(s)) for s in group])[None]
        out.append(MicroBatch(ids, labels, None, positions, ids.numel()))
    return out


def backward_step(model: Qwen2ForCausalLM, batches: list[MicroBatch], precision: str) -> torch.Tensor:
    """Accumulates into .grad the gradient of one step's loss (summed next-token cross entropy over the step's
    target count) over its micro-batches; returns that loss (a detached scalar)."""
    targets = sum(int((mb.labels != IGNORE).sum()) for mb in batches)
    total = torch.zeros((), device=batches[0].input_ids.device)
    for mb in batches:
        autocast = torch.autocast(mb.input_ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            logits = model(
                input_ids=mb.input_ids,
                attention_mask=mb.attention_mask,
                position_ids=mb.position_ids,
                use_cache=False,
            ).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), mb.labels.flatten(), ignore_index=IGNORE, reduction="sum")
        (loss / targets).backward()
        total += loss.detach() / targets
    return total


def grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def numerics_check(base, padded, packed, precision: str, device: torch.device, tol: float) -> dict:
    """One backward pass per layout from base's weights; see the module docstring for the pass rule."""
    model = copy.deepcopy(base).to(device).train()
    seen = {}
    for name, batches in (("padded", padded), ("packed", packed)):
        model.zero_grad(set_to_none=True)
        loss = float(backward_step(model, [mb.to(device) for mb in batches], precision))
        seen[name] = (loss, grad_norm(model))
    (loss_pad, norm_pad), (loss_pack, norm_pack) = seen["padded"], seen["packed"]
    loss_diff, norm_diff = abs(loss_pad - loss_pack), abs(norm_pad - norm_pack)
    return {
        "sequences": sum(mb.input_ids.shape[0] for mb in padded),
        "loss_padded": loss_pad,
        "loss_packed": loss_pack,
        "loss_abs_diff": loss_diff,
        "grad_norm_padded": norm_pad,
        "grad_norm_packed": norm_pack,
        "grad_norm_abs_diff": norm_diff,
        "grad_norm_rel_diff": norm_diff / max(norm_pad, 1e-30),
        "tolerance": tol,
        "passed": loss_diff <= tol and norm_diff / max(norm_pad, 1e-30) <= tol,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layout(base, batches: list[MicroBatch], args, device: torch.device, flops: float) -> dict:
    """Warm-up and timed AdamW steps of one layout on a fresh copy of base; see the module docstring."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(base).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    on_device = [mb.to(device) for mb in batches]
    seconds = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = backward_step(model, on_device, args.precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    real, computed = sum(mb.real_tokens for mb in batches), sum(mb.computed_tokens for mb in batches)
    return {
        "micro_batches": len(batches),
        "real_tokens_per_step": real,
        "computed_tokens_per_step": computed,
        "step_s": seconds,
        "step_s_median": step_s,
        "real_tokens_per_s": real / step_s,
        "computed_tokens_per_s": computed / step_s,
        "model_tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (args.peak_tflops * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "last_loss": float(loss),
    }


def build_model(args) -> Qwen2ForCausalLM:
    """A random-init Qwen2 of the flags' shape, fp32 on cpu (each layout copies it to the device)."""
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.max_len, args.pack_tokens),
        tie_word_embeddings=not args.untied,
    )
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation=args.attn, dtype=torch.float32)


def model_flops(model: Qwen2ForCausalLM, lengths: list[int]) -> tuple[float, int]:
    """(model FLOPs of one step over sequences of these lengths, N); the formula is in the module docstring."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())  # a tied matrix is counted once
    matmul = params if cfg.tie_word_embeddings else params - model.get_input_embeddings().weight.numel()
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * sum(s * s for s in lengths)
    return 6 * matmul * sum(lengths) + attention, matmul


def machine_info(device: torch.device) -> dict:
    def version(package: str) -> str | None:
        return importlib.metadata.version(package) if importlib.util.find_spec(package) else None

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "flash_attn": version("flash_attn"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def table(paths: dict[str, dict]) -> str:
    """One line per layout, each column as wide as its heading."""
    head = ("layout", "micro-batches", "real tok/step", "computed tok/step", "step s", "real tok/s", "computed tok/s")
    head = (*head, "MFU %", "peak GiB")
    lines = ["  ".join(head)]
    for name, r in paths.items():
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        cells = (
            name, r["micro_batches"], r["real_tokens_per_step"], r["computed_tokens_per_step"],
            f"{r['step_s_median']:.4f}", f"{r['real_tokens_per_s']:.0f}", f"{r['computed_tokens_per_s']:.0f}",
            f"{100 * r['mfu']:.3f}", memory,
        )  # fmt: skip
        lines.append("  ".join(f"{c:>{len(h)}}" for c, h in zip(cells, head, strict=True)))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"small defaults for a CPU check in seconds: {TINY}")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--precision", choices=sorted(TOLERANCE), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--untied", action="store_true", help="a separate LM head instead of the tied embedding")
    parser.add_argument("--sequences", type=int, default=64, help="sequences per optimizer step")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--padded-batch", type=int, default=8, help="sequences per padded micro-batch")
    parser.add_argument("--pack-tokens", type=int, default=8192, help="tokens per packed micro-batch (one row)")
    parser.add_argument("--check-sequences", type=int, default=8, help="sequences in the numerics check")
    parser.add_argument("--tol", type=float, help="numerics check tolerance (default: 1e-2 bf16, 1e-5 fp32)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per layout")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="device peak, TFLOP/s")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/gpu_learner-<time>.json)")
    if parser.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
    if args.pack_tokens < args.max_len:
        parser.error(f"--pack-tokens {args.pack_tokens} is below --max-len {args.max_len}: a sequence would not fit")
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"need 1 <= --min-len ({args.min_len}) <= --max-len ({args.max_len})")
    if args.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        parser.error("--attn flash_attention_2 needs the flash_attn package, which is not installed")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch sees no CUDA device (give --device cpu)")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.tol = TOLERANCE[args.precision] if args.tol is None else args.tol
    args.out = args.out or RESULTS / f"gpu_learner-{datetime.now():%Y%m%d-%H%M%S}.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, writes the results JSON to --out and returns it."""
    args = parse_args(argv)
    device = torch.device(args.device)
    seqs = draw_sequences(args.sequences, args.min_len, args.max_len, args.vocab, args.seed)
    lengths = [len(s) for s in seqs]
    base = build_model(args)
    flops, matmul_params = model_flops(base, lengths)
    results = {
        "benchmark": "gpu_learner",
        "time": datetime.now().isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "machine": machine_info(device),
        "settings": {**vars(args), "out": str(args.out)},
        "model": {"parameters": sum(p.numel() for p in base.parameters()), "matmul_parameters": matmul_params},
        "workload": {
            "sequences": len(seqs),
            "real_tokens": sum(lengths),
            "length_min_mean_max": [min(lengths), statistics.mean(lengths), max(lengths)],
            "model_flops_per_step": flops,
        },
        "paths": {},
    }
    sample = seqs[: args.check_sequences]
    pair = padded_batches(sample, args.padded_batch), packed_batches(sample, args.pack_tokens)
    check = results["check"] = numerics_check(base, *pair, args.precision, device, args.tol)
    print(
        f"numerics check on {check['sequences']} sequences ({args.precision}): loss diff {check['loss_abs_diff']:.3g}, "
        f"grad-norm diff {check['grad_norm_abs_diff']:.3g} (relative {check['grad_norm_rel_diff']:.3g}), "
        f"tolerance {args.tol:g}: {'passed' if check['passed'] else 'FAILED'}"
    )
    if check["passed"]:
        layouts = {"padded": padded_batches(seqs, args.padded_batch), "packed": packed_batches(seqs, args.pack_tokens)}
        for name, batches in layouts.items():
            results["paths"][name] = time_layout(base, batches, args, device, flops)
        speed = {name: r["real_tokens_per_s"] for name, r in results["paths"].items()}
        results["speedup_packed_over_padded"] = speed["packed"] / speed["padded"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not check["passed"]:
        raise SystemExit(f"numerics check failed, nothing timed: {json.dumps(check)}; results in {args.out}")
    print(
        f"{results['machine']['device']}, {results['model']['parameters'] / 1e6:.1f}M parameters, {args.precision}, "
        f"attn {args.attn}, {len(seqs)} sequences ({sum(lengths)} tokens) per step, {args.steps} timed steps"
    )
    print(table(results["paths"]))
    print(f"packed / padded, real tokens/s: {results['speedup_packed_over_padded']:.2f}x; results in {args.out}")
    return results


if __name__ == "__main__":
    main()
