"""`raylign report RUN_DIR`: RUN_DIR/report.html, one self-contained page of a run (DESIGN.md run-directory
contract): summary.json and eval.json with their intervals, the stage timeline, every plot (embedded as data URIs),
the resolved config.yaml, and relative links to tb/ and models/. It opens from disk with no server and no network.
A missing piece (no eval, no plots) is left out with a note; every text put into the page is escaped."""

from __future__ import annotations

import base64
import json
import shlex
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from pipeline.errors import UserError

REPORT = "report.html"
# summary.json keys shown first, in this order (DESIGN.md); the rest follow sorted.
HEADLINE = [
    "steps",
    "wall_s",
    "samples_per_s",
    "tokens_per_s",
    "reward/initial",
    "reward/final",
    "gold_reward/initial",
    "gold_reward/final",
    "kl/final",
    "mismatch/logprob_abs_max",
    "rm/heldout_accuracy",
]
# The reward stage records timing/rm: timing/reward is the rl stage's reward scoring.
STAGE_TIMING = {"reward": "timing/rm"}
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232a;margin:0;background:#f5f6f8}
main{max-width:1100px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:8px 0 2px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d9de}
h3{font-size:14px;margin:16px 0 6px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:4px 18px 14px;margin-top:16px}
.sub,.note{color:#5c6670} .note{font-style:italic}
table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 12px 3px 0;text-align:left;vertical-align:top}
th{font-weight:600;border-bottom:1px solid #d5d9de} td.num{font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc} .iv{color:#5c6670}
.tl{display:grid;grid-template-columns:90px 1fr 150px;gap:4px 10px;align-items:center}
.track{background:#eef0f3;height:18px;border-radius:3px;position:relative}
.bar{position:absolute;top:0;bottom:0;background:#4878a8;border-radius:3px;min-width:2px}
.cols{display:flex;flex-wrap:wrap;gap:8px 36px;align-items:flex-start}
.plots{display:flex;flex-wrap:wrap;gap:14px} figure{margin:0}
figure img{display:block;width:auto;height:auto;max-width:100%;max-height:290px;border:1px solid #e1e4e8}
figcaption{color:#5c6670;font-size:12px}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:10px;overflow:auto;font-size:12px}
code{background:#f0f2f4;padding:1px 4px;border-radius:3px}
"""


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.html; -> its path. UserError when run_dir has no config.yaml."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run dir (no config.yaml)")
    path = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    tmp.write_text(render(run_dir.resolve()), encoding="utf-8")
    tmp.replace(path)
    return path


def render(run_dir: Path) -> str:
    config_text = (run_dir / "config.yaml").read_text(errors="replace")
    config = _yaml_or_empty(config_text)
    summary, summary_note = _read_json(run_dir / "summary.json")
    evaluation, eval_shown = eval_html(run_dir)
    stages = [s for s in config.get("stages") or [] if isinstance(s, str)]
    parts = [
        f"<h1>{escape(run_dir.name)}</h1>",
        f'<p class="sub">{escape(str(run_dir))} &middot; stages: {escape(", ".join(stages) or "none")}</p>',
        _section("Summary", summary_note or summary_html(summary, stages, eval_shown)),
        _section("Evaluation", evaluation),
        _section("Stage timeline", summary_note or timeline_html(summary, stages)),
        _section("Plots", plots_html(run_dir)),
        _section("TensorBoard and models", links_html(run_dir)),
        _section("Resolved config (config.yaml)", f"<pre>{escape(config_text)}</pre>"),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(run_dir.name)} '
        f"&middot; raylign report</title><style>{STYLE}</style></head>\n<body><main>\n"
        + "\n".join(parts)
        + "\n</main></body></html>\n"
    )


def summary_html(summary: dict[str, Any], stages: list[str], eval_shown: bool) -> str:
    """summary.json in side-by-side tables: the run's numbers, the eval/* entries (unless the Evaluation section
    shows eval.json), the time inside stages. `k_low` and `k_high` fold into k's row as its interval; stage
    timings are left to the timeline."""
    skip = {timing_key(s) for s in stages}
    keys = [k for k in summary if k not in skip and not _is_bound(k, summary)]
    ordered = [k for k in HEADLINE if k in keys] + sorted(k for k in keys if k not in HEADLINE)
    groups: dict[str, list[str]] = {"run": [], "eval/*": [], "time inside stages (s)": []}
    for key in ordered:
        group = "run"
        if key.startswith(("timing/", "eval/")):
            group = "eval/*" if key.startswith("eval/") else "time inside stages (s)"
        bounded = f"{key}_low" in summary and f"{key}_high" in summary
        value = (
            _interval(summary[key], summary[f"{key}_low"], summary[f"{key}_high"])
            if bounded
            else escape(_fmt(summary[key]))
        )
        groups[group].append(f'<tr><td><code>{escape(key)}</code></td><td class="num">{value}</td></tr>')
    if not ordered:
        return _note("summary.json has no entries.")
    if eval_shown and groups.pop("eval/*"):
        note = _note("The eval/* entries are eval.json's headline numbers: see Evaluation below.")
    else:
        note = ""
    tables = "".join(f"<div>{_table([name, 'value'], rows)}</div>" for name, rows in groups.items() if rows)
    return f'<div class="cols">{tables}</div>{note}'


def eval_html(run_dir: Path) -> tuple[str, bool]:
    """(the Evaluation section's body, whether it shows eval.json's numbers)."""
    report, note = _read_json(run_dir / "eval.json")
    if note:
        return note, False
    try:
        return _eval_tables(report), True
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        return _note(f"eval.json has an unexpected layout ({type(e).__name__}: {e}); see the file itself."), False


def _eval_tables(ev: dict[str, Any]) -> str:
    level = ev.get("confidence")
    out = [
        f'<p class="sub">{escape(_fmt(ev.get("prompts", "?")))} held-out prompts, '
        f"{escape(_fmt(ev.get('samples_per_prompt', '?')))} samples each; intervals: "
        f"{escape(_fmt(level * 100 if isinstance(level, int | float) else '?'))}% bootstrap over prompts "
        f"({escape(_fmt(ev.get('bootstrap_resamples', '?')))} resamples).<br>policy "
        f"<code>{escape(str(ev.get('policy', '?')))}</code>, reference "
        f"<code>{escape(str(ev.get('reference', '?')))}</code></p>"
    ]
    win, mine, theirs = ev.get("win_rate") or {}, ev.get("policy_means") or {}, ev.get("reference_means") or {}
    names = list(dict.fromkeys([*win, *mine, *theirs]))
    rows = [
        f"<tr><td>{escape(n)}</td>"
        + "".join(f'<td class="num">{_iv(d.get(n))}</td>' for d in (mine, theirs, win))
        + "</tr>"
        for n in names
    ]
    if rows:
        out.append(_table(["measure", "policy mean", "reference mean", "policy win rate"], rows))
    if bon := ev.get("best_of_n"):
        out.append("<h3>Best-of-N from the reference</h3>")
        out.append(
            _table(
                ["N", "KL (analytic)", "reward", "gold reward"],
                [
                    f'<tr><td class="num">{escape(_fmt(r["n"]))}</td><td class="num">{escape(_fmt(r["kl"]))}</td>'
                    f'<td class="num">{_iv(r.get("reward"))}</td><td class="num">{_iv(r.get("gold"))}</td></tr>'
                    for r in bon
                ],
            )
        )
    if cal := ev.get("calibration"):
        out.append("<h3>Reward-model calibration on held-out pairs</h3>")
        cells = [
            ("pairs", escape(_fmt(cal.get("pairs")))),
            ("members", escape(_fmt(cal.get("members")))),
            ("accuracy", _iv(cal.get("accuracy"))),
            ("ECE", escape(_fmt(cal.get("ece")))),
        ]
        if "disagreement_error_corr" in cal:
            cells.append(("corr(disagreement, error)", escape(_fmt(cal["disagreement_error_corr"]))))
        out.append(_table(["", ""], [f'<tr><td>{k}</td><td class="num">{v}</td></tr>' for k, v in cells]))
    else:
        out.append(_note("No reward-model calibration (no reward model or no held-out preferences)."))
    return "\n".join(out)


def timing_key(stage: str) -> str:
    return STAGE_TIMING.get(stage, f"timing/{stage}")


def timeline_html(summary: dict[str, Any], stages: list[str]) -> str:
    """The stages one after another on one time axis, as CSS bars: offset = the stages before, width = its own."""
    spans = [(s, float(summary[timing_key(s)])) for s in stages if isinstance(summary.get(timing_key(s)), int | float)]
    total = sum(d for _, d in spans)
    if not spans or total <= 0:
        return _note("No stage timings in summary.json (no stage has finished).")
    rows, start = [], 0.0
    for stage, seconds in spans:
        left, width = 100 * start / total, 100 * seconds / total
        rows.append(
            f"<div><code>{escape(stage)}</code></div>"
            f'<div class="track"><div class="bar" style="left:{left:.2f}%;width:{width:.2f}%"></div></div>'
            f'<div class="num">{seconds:,.1f} s ({width:.0f}%)</div>'
        )
        start += seconds
    missing = [s for s in stages if s not in dict(spans)]
    wall = summary.get("wall_s")
    foot = f"stages: {total:,.1f} s" + (f" of {wall:,.1f} s wall" if isinstance(wall, int | float) else "")
    if missing:
        foot += f"; no timing for {', '.join(missing)}"
    return f'<div class="tl">{"".join(rows)}</div><p class="sub">{escape(foot)}</p>'


def plots_html(run_dir: Path) -> str:
    pngs = sorted((run_dir / "plots").glob("*.png")) + sorted(run_dir.glob("stages/**/plots/*.png"))
    if not pngs:
        return _note("No plots in plots/ (the stages that draw them did not run).")
    figures = []
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = escape(str(png.relative_to(run_dir)))
        figures.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'
        )
    return f'<div class="plots">{"".join(figures)}</div>'


def links_html(run_dir: Path) -> str:
    items = []
    if (run_dir / "tb").is_dir():
        command = f"tensorboard --logdir {shlex.quote(str(run_dir / 'tb'))}"
        items.append(f"<li>{_link('tb/')}: TensorBoard logs; view them with <code>{escape(command)}</code></li>")
    else:
        items.append(f"<li>{_note('No tb/ dir (no TensorBoard logs).')}</li>")
    models = sorted(p for p in (run_dir / "models").glob("*") if p.is_dir())
    for model in models:
        items.append(f"<li>{_link(f'models/{model.name}/')}: exported model (HF <code>save_pretrained</code> dir)</li>")
    if not models:
        items.append(f"<li>{_note('No exported models in models/.')}</li>")
    files = [f for f in ("config.yaml", "summary.json", "eval.json", "metrics.jsonl") if (run_dir / f).is_file()]
    files += [d + "/" for d in ("logs", "checkpoints") if (run_dir / d).is_dir()]
    items.append(f"<li>files: {', '.join(_link(f) for f in files)}</li>")
    return f"<ul>{''.join(items)}</ul>"


def _read_json(path: Path) -> tuple[dict[str, Any], str]:
    """(contents, "") or ({}, a note saying why there are none)."""
    if not path.is_file():
        return {}, _note(f"No {path.name} in this run dir.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {}, _note(f"{path.name} could not be read: {e}")
    if not isinstance(data, dict):
        return {}, _note(f"{path.name} is not a JSON object.")
    return data, ""


def _yaml_or_empty(text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_bound(key: str, summary: dict[str, Any]) -> bool:
    """`key` is the `_low` or `_high` bound of a key with both bounds."""
    for suffix in ("_low", "_high"):
        base = key.removesuffix(suffix)
        if key.endswith(suffix) and base in summary and f"{base}_low" in summary and f"{base}_high" in summary:
            return True
    return False


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "null"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _interval(mean: Any, low: Any, high: Any) -> str:
    return f'{escape(_fmt(mean))} <span class="iv">[{escape(_fmt(low))}, {escape(_fmt(high))}]</span>'


def _iv(iv: Any) -> str:
    """An eval.json interval {"mean", "low", "high"} as `mean [low, high]`; blank when absent."""
    return _interval(iv["mean"], iv["low"], iv["high"]) if isinstance(iv, dict) else ""


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header) if any(header) else ""
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{''.join(rows)}</table>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>\n{body}\n</section>"


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _link(relative: str) -> str:
    return f'<a href="{escape(quote(relative))}">{escape(relative)}</a>'
