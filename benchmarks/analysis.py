"""Turn the raw results of `make bench` into the figures the report prints, and check them against the targets of
DESIGN.md. Pure functions of the results dict (no I/O), so the report can be regenerated from any results file."""

from __future__ import annotations

from statistics import median
from typing import Any

GIB, MIB = 2**30, 2**20
STAGES = ("data", "gen", "reward", "ref", "values", "advantage", "stream", "train", "sync", "other")
OVERHEAD = ("data", "stream", "advantage", "other", "outside")  # not generation, scoring, reference, train, sync


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": median(values), "max": max(values), "n": len(values)} if values else {}


def step_durations(events: dict) -> list[dict]:
    """Steps with `seconds`: wall time from the previous step's end (from `ready` for the first)."""
    out, last = [], events["ready"]
    for s in events["steps"]:
        out.append({**s, "seconds": s["time"] - last})
        last = s["time"]
    return out


def steady(events: dict, warmup: int) -> list[dict]:
    """The steps after the first `warmup`, without the last (raylign writes its checkpoint there)."""
    steps = step_durations(events)
    return steps[warmup:-1] if len(steps) > warmup + 1 else steps[-1:]


def throughput(events: dict, warmup: int) -> dict[str, float]:
    steps = steady(events, warmup)
    seconds = sum(s["seconds"] for s in steps)
    return {
        "startup_s": events["ready"] - events["launched"],
        "samples_per_s": sum(s["samples"] for s in steps) / seconds,
        "tokens_per_s": sum(s["tokens"] for s in steps) / seconds,
        "step_s": seconds / len(steps),
        "steady_steps": len(steps),
        "total_s": events["finished"] - events["launched"],
    }


def grpo_summary(grpo: dict) -> dict[str, Any]:
    out = {}
    for name, policy in grpo["policies"].items():
        per_tool: dict[str, list[dict]] = {}
        for run in policy["runs"]:
            per_tool.setdefault(run["tool"], []).append(throughput(run, grpo["warmup_steps"]))
        entry = {tool: {k: spread([r[k] for r in rows]) for k in rows[0]} for tool, rows in per_tool.items()}
        for tool in entry:  # raylign's own step metrics: bytes a weight sync sent, learner tokens computed / real
            steps = [s for run in policy["runs"] if run["tool"] == tool for s in run["steps"]]
            sent = [s["sync/bytes"] for s in steps if "sync/bytes" in s]
            ratios = [s["tokens/computed"] / s["tokens/real"] for s in steps if s.get("tokens/real")]
            entry[tool].update({"sync_bytes": median(sent) if sent else None})
            entry[tool].update({"computed_over_real": median(ratios) if ratios else None})
        if {"raylign", "trl"} <= set(entry):
            for key in ("samples_per_s", "tokens_per_s"):
                entry[f"ratio_{key}"] = entry["raylign"][key]["median"] / entry["trl"][key]["median"]
        out[name] = entry
    return out


def step_time_summary(grpo: dict, policy: str = "tiny") -> dict[str, Any]:
    """Median seconds per stage over the steady steps of raylign's runs on `policy`; `outside` is the wall time
    between two steps that the loop's own timer does not see (the consumer, Ray Data hand-off)."""
    rows = []
    for run in grpo["policies"][policy]["runs"]:
        if run["tool"] == "raylign":
            for s in steady(run, grpo["warmup_steps"]):
                row = {k: s.get(f"timing/{k}", 0.0) for k in STAGES}
                row["outside"] = s["seconds"] - s["timing/step"]
                row["step"] = s["seconds"]
                rows.append(row)
    if not rows:
        return {}
    seconds = {k: median(r[k] for r in rows) for k in (*STAGES, "outside", "step")}
    overhead = [sum(r[k] for k in OVERHEAD) / r["step"] for r in rows]
    return {
        "policy": policy,
        "steps": len(rows),
        "seconds": seconds,
        "overhead_fraction": median(overhead),
        "sync_share": median(r["sync"] / r["step"] for r in rows),
    }


def rollout_summary(rollout: dict) -> dict[str, Any]:
    by: dict[tuple[str, int], list[float]] = {}
    for run in rollout["runs"]:
        for r in run["runs"]:
            by.setdefault((run["engine"], r["batch"]), []).append(r["tokens_per_s"])
    batches = sorted({b for _, b in by})
    out = {}
    for b in batches:
        row = {e: spread(by.get((e, b), [])) for e in ("vllm", "hf")}
        if row["vllm"] and row["hf"]:
            row["ratio"] = row["vllm"]["median"] / row["hf"]["median"]
        out[str(b)] = row
    return out


def engines_summary(engines: dict) -> dict[str, list[dict]]:
    """Per policy and engine: median seconds of one update, real tokens/s, computed / real tokens, process RSS, and
    the largest loss and weight differences from the torch engine after the same updates."""
    out = {}
    for name, section in engines["policies"].items():
        rows = []
        for row in section["rows"]:
            seconds = median(row["update_s"])
            rows.append(
                {
                    "engine": row["engine"],
                    "update_s": seconds,
                    "real_tokens_per_s": row["tokens"]["real"] / seconds,
                    "computed_over_real": row["tokens"]["computed"] / row["tokens"]["real"],
                    "rss_mib": row["rss"] / MIB,
                    "loss_diff": row["loss_abs_diff_vs_torch"],
                    "weight_diff": row["weight_abs_diff_vs_torch"],
                }
            )
        out[name] = rows
    return out


def memory_summary(memory: dict) -> list[dict]:
    rows = []
    for row in memory["rows"]:
        ranks = row["per_rank"]
        worst = max(ranks, key=lambda r: r["total"])
        rows.append(
            {
                "zero_stage": row["zero_stage"],
                "learners": row["learners"],
                "lora": row.get("lora", 0),
                "numel": worst["numel"],
                **{f"{k}_mib": worst[k] / MIB for k in ("params", "master", "grads", "optimizer", "total", "rss")},
            }
        )
    return rows


def async_summary(section: dict, warmup: int) -> dict[str, Any]:
    out = {}
    for mode, events in section["runs"].items():
        evals = events["evals"]
        final = [e for e in evals if e.get("final")]
        out[mode] = {
            **throughput(events, warmup),
            "samples": sum(s["samples"] for s in events["steps"]),
            "gold_initial": evals[0].get("eval/gold_reward"),
            "gold_final": final[-1].get("eval/gold_reward") if final else None,
            "train_gold_last": events["steps"][-1].get("gold_reward/mean"),
        }
    return out


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Each DESIGN.md target with its measured value (None when its part was not run)."""
    grpo, step = s.get("grpo", {}), s.get("step_time", {})
    rollout = s.get("rollout", {}).get("64", {})
    peak = s.get("peak", {})
    rows = [
        ("GRPO samples/s vs TRL, ~25M policy", grpo.get("25m", {}).get("ratio_samples_per_s"), ">=", 2.0, "x"),
        ("GRPO samples/s vs TRL, tiny policy", grpo.get("tiny", {}).get("ratio_samples_per_s"), ">=", 1.0, "x"),
        ("vLLM vs HF generate tokens/s, batch 64", rollout.get("ratio"), ">=", 1.5, "x"),
        ("orchestration overhead, share of step", step.get("overhead_fraction"), "<=", 0.10, "%"),
        ("weight sync, share of step", step.get("sync_share"), "<=", 0.05, "%"),
        ("peak memory of `make run`", peak.get("rss_gib"), "<=", 8.0, "GiB"),
        ("`make run` wall time", peak.get("wall_min"), "<=", 10.0, "min"),
    ]
    out = []
    for name, value, op, target, unit in rows:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"target": name, "value": value, "op": op, "goal": target, "unit": unit, "met": met})
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "grpo" in results:
        s["grpo"] = grpo_summary(results["grpo"])
        s["step_time"] = step_time_summary(results["grpo"])
    if "rollout" in results:
        s["rollout"] = rollout_summary(results["rollout"])
    if "sync" in results:
        s["sync"] = [
            {
                "model": m["model"],
                "parameters": m["parameters"],
                "sync_s": median(m["sync_s"]),
                "broadcast_s": median(m["broadcast_s"]),
            }
            for m in results["sync"]["models"]
        ]
    if "engines" in results:
        s["engines"] = engines_summary(results["engines"])
    if "memory" in results:
        s["memory"] = memory_summary(results["memory"])
    if "async" in results:
        s["async"] = async_summary(results["async"], warmup=results.get("grpo", {}).get("warmup_steps", 2))
    if "peak" in results:
        p = results["peak"]
        s["peak"] = {
            "rss_gib": p["peak_rss_bytes"] / GIB,
            "pss_gib": p["peak_pss_bytes"] / GIB,
            "wall_min": p["wall_s"] / 60,
            "returncode": p["returncode"],
            "command": p["command"],
            "note": p.get("note"),
        }
    s["targets"] = targets(s)
    return s
