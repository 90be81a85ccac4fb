"""`raylign`: the command line. Each command parses its arguments and calls one function of the pipeline.

Exit codes (DESIGN.md): 0 success; 2 bad usage, config or input data (one line, no traceback); 1 run failure;
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import RunFailure, UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.console import cpu_accelerator_without_a_gpu
    from pipeline.tasks.synthetic import write_task

    cfg = load_config(args.config, args.overrides)
    cpu_accelerator_without_a_gpu()
    write_task(Path(args.out), cfg.synth, seed=args.seed if args.seed is not None else cfg.run.seed)
    print(Path(args.out).resolve())
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from pipeline.config import DataConfig
    from pipeline.data import RowCheck, check_file

    defaults = DataConfig()
    check = RowCheck(
        args.kind,
        tokenizer_dir=Path(args.tokenizer) if args.tokenizer else None,
        max_prompt_tokens=args.max_prompt_tokens or defaults.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens or defaults.max_response_tokens,
    )
    report = check_file(Path(args.file), check)
    print(
        f"{report.path}: {report.rows} rows of {report.kind}, {report.good_rows} good, {len(report.bad)} bad, "
        f"{len(report.duplicates)} duplicates"
    )
    if check.tokenizer is None:
        print("lengths in whitespace words (give --tokenizer DIR for token counts and length limits)")
    for column, s in report.length_stats().items():
        print(
            f"  {column:<9} {report.length_unit}: min {s['min']}  mean {s['mean']:.1f}  p50 {s['p50']}  "
            f"p95 {s['p95']}  max {s['max']}"
        )
    for row, first in report.duplicates:
        print(f"{report.path}: row {row}: duplicate of row {first}")
    for bad in report.bad:
        print(bad.describe(report.path), file=sys.stderr)
    return 2 if report.bad else 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.console import cpu_accelerator_without_a_gpu, set_verbose
    from pipeline.run import Interrupted, run

    cfg = load_config(args.config, args.overrides)
    set_verbose(args.verbose)
    cpu_accelerator_without_a_gpu()
    try:
        run_dir = run(cfg, resume=Path(args.resume) if args.resume else None)
    except Interrupted as e:
        print(f"raylign: {e}; resume with: raylign run {args.config} --resume <run dir>", file=sys.stderr)
        return e.exit_code
    print(run_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.console import cpu_accelerator_without_a_gpu
    from pipeline.run import Interrupted
    from pipeline.sweep import sweep

    cfg = load_config(args.config, args.overrides)
    cpu_accelerator_without_a_gpu()
    try:
        sweep_dir = sweep(cfg, resume=Path(args.resume) if args.resume else None)
    except Interrupted as e:
        print(f"raylign: {e}; resume with: raylign sweep {args.config} --resume <sweep dir>", file=sys.stderr)
        return e.exit_code
    import ray

    ray.shutdown()  # workers' late log lines come before the sweep dir, which stays the last line
    print(sweep_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    print(write_report(Path(args.run_dir)))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from pipeline.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylign",
        description="Alignment as inverse RL on Ray: recover a reward from human data, then optimize against it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth",
        help="write the synthetic IRL task: data, tokenizer, tiny models, gold reward",
        description="Write prompts/demos/preferences (Parquet), a tokenizer, a tiny policy and reward model and "
        "task.json into --out. Sizes come from the `synth` config section.",
    )
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=None, help="data and model seed (default: run.seed)")
    synth.add_argument("--config", default=None, help="config file for the `synth` section (default: defaults)")
    synth.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. synth.num_prompts=64")
    synth.set_defaults(func=cmd_synth)

    data = commands.add_parser("data", help="inspect input data").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    check = data.add_parser(
        "check",
        help="row count, length statistics and every bad row of a data file",
        description="Read FILE (Parquet or JSONL) as --kind data; print the row count, length statistics, "
        "duplicates and every bad row (file, row, reason). Exit 2 if any row is bad. Rows count from 0.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--kind", required=True, choices=["prompts", "demos", "preferences"])
    check.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer dir for token counts and limits")
    check.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="prompt length limit (default: data.max_prompt_tokens)",
    )
    check.add_argument(
        "--max-response-tokens",
        type=int,
        default=None,
        help="response length limit (default: data.max_response_tokens)",
    )
    check.set_defaults(func=cmd_data_check)

    run = commands.add_parser(
        "run",
        help="run the configured stages on a local Ray (or the cluster in RAY_ADDRESS)",
        description="Run every stage of CONFIG in order into a new run dir (<run.output_dir>/<run.name>-<time>), "
        "whose path is the last line printed. Exit 130/143 on SIGINT/SIGTERM after checkpointing the RL step "
        "that finished; --resume RUN_DIR continues from the last complete checkpoint.",
    )
    run.add_argument("config", metavar="CONFIG")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.max_steps=5 algo.kl.coef=0.1")
    run.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue this run dir (its saved config)")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' logs (Ray, vLLM, DeepSpeed) here too, not only in RUN_DIR/logs/",
    )
    run.set_defaults(func=cmd_run)

    sweep = commands.add_parser(
        "sweep",
        help="Ray Tune trials over config keys (e.g. the KL coefficient); the reward-vs-KL frontier",
        description="Run the stages before `rl` once, then one Ray Tune trial per point of the `sweep.space` of "
        "CONFIG, each running `rl` and reporting every step, in a new sweep dir (printed last) with results.csv, "
        "best.yaml and frontier.png. Exit 130 on SIGINT after saving the Tune state; --resume SWEEP_DIR runs only "
        "the unfinished trials.",
    )
    sweep.add_argument("config", metavar="CONFIG")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.max_steps=10 sweep.scheduler=asha")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", default=None, help="continue this sweep dir (its saved config)")
    sweep.set_defaults(func=cmd_sweep)

    report = commands.add_parser(
        "report",
        help="write RUN_DIR/report.html: one self-contained page of a run",
        description="Write RUN_DIR/report.html (and print its path): summary.json and eval.json with their "
        "intervals, the stage timeline, every plot (embedded), the resolved config.yaml, and links to tb/ and "
        "models/. The page opens from disk, with no server and no network. `raylign run` writes it at its end.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run dir (holds config.yaml)")
    report.set_defaults(func=cmd_report)

    config = commands.add_parser("config", help="inspect configs").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND"
    )
    show = config.add_parser(
        "show",
        help="print the resolved config (YAML, overrides applied, defaults filled in)",
        description="Validate CONFIG with the overrides and print the resolved YAML. Exit 2 naming the key on "
        "any unknown key, wrong type or bad value.",
    )
    show.add_argument("config", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. algo.kl.coef=0.1 stages=[reward]")
    show.set_defaults(func=cmd_config_show)

    from pipeline.submit import add_commands as add_submit_commands  # `submit` and `jobs list|status|logs|stop`

    add_submit_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"raylign: error: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:
        print(f"raylign: run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raylign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
