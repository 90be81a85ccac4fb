"""`raylign report RUN_DIR` (pipeline/report.py): one self-contained page from a run dir built here by hand, no Ray."""

import base64
import json
import re

import pytest

from pipeline.cli import main
from pipeline.report import REPORT, write_report

PLANTED = "<script>alert('x')</script>"


def tiny_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1), dpi=20)
    ax.plot([0, 1], [0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def interval(mean, low, high):
    return {"mean": mean, "low": low, "high": high}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "tiny_grpo-20261202-101010"
    d.mkdir()
    config = f"run:\n  name: {json.dumps(PLANTED)}\n  max_steps: 3\nstages: [synth, sft, reward, rl, eval]\n"
    (d / "config.yaml").write_text(config)
    summary = {
        "steps": 3,
        "wall_s": 120.0,
        "reward/final": 0.625,
        "kl/final": 0.0125,
        "timing/synth": 2.0,
        "timing/sft": 30.0,
        "timing/rm": 40.0,
        "timing/rl": 45.0,
        "timing/eval": 3.0,
        "timing/gen": 9.5,
        "eval/win_rate_gold_reward": 0.613,
        "eval/win_rate_gold_reward_low": 0.571,
        "eval/win_rate_gold_reward_high": 0.652,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    report = {
        "policy": "/x/models/policy",
        "reference": "/x/stages/sft/policy",
        "prompts": 16,
        "samples_per_prompt": 4,
        "confidence": 0.95,
        "bootstrap_resamples": 1000,
        "win_rate": {"gold": interval(0.613, 0.571, 0.652)},
        "policy_means": {"gold": interval(0.77, 0.74, 0.8), "length": interval(12.0, 11.0, 13.0)},
        "reference_means": {"gold": interval(0.61, 0.58, 0.64), "length": interval(14.0, 13.0, 15.0)},
        "best_of_n": [{"n": 4, "kl": 0.636, "reward": interval(0.9, 0.85, 0.95)}],
        "calibration": {"pairs": 64, "members": 1, "accuracy": interval(0.875, 0.8, 0.94), "ece": 0.042},
    }
    (d / "eval.json").write_text(json.dumps(report))
    tiny_png(d / "plots" / "reward.png")
    tiny_png(d / "stages" / "irl" / "plots" / "disc.png")
    (d / "tb").mkdir()
    (d / "models" / "policy").mkdir(parents=True)
    (d / "models" / "reward").mkdir()
    return d


def test_the_report_holds_summary_eval_intervals_timeline_and_config(run_dir):
    html = write_report(run_dir).read_text()
    assert (run_dir / REPORT).is_file()
    assert "<code>steps</code>" in html and ">3<" in html and "0.625" in html and "0.0125" in html
    # eval.json's intervals in its tables; summary.json's eval/* copies of them are not shown twice
    assert '0.613 <span class="iv">[0.571, 0.652]</span>' in html
    assert "eval/win_rate_gold_reward" not in html and "see Evaluation below" in html
    assert '0.77 <span class="iv">[0.74, 0.8]</span>' in html and '0.875 <span class="iv">[0.8, 0.94]</span>' in html
    assert "95% bootstrap" in html and "0.042" in html
    # timeline: one bar per stage, in config order, the reward stage's time read from timing/rm
    bars = re.findall(
        r"<div><code>(\w+)</code></div><div class=\"track\"><div class=\"bar\" style=\"left:([\d.]+)%;"
        r"width:([\d.]+)%\"></div></div><div class=\"num\">([\d.,]+) s",
        html,
    )
    assert [b[0] for b in bars] == ["synth", "sft", "reward", "rl", "eval"]
    assert [b[3] for b in bars] == ["2.0", "30.0", "40.0", "45.0", "3.0"]
    assert float(bars[2][1]) == pytest.approx(100 * 32 / 120, abs=0.01)  # starts after synth + sft
    assert "<code>timing/gen</code>" in html and "<code>timing/rl</code>" not in html  # stage time: timeline only
    assert "<pre>" in html and "max_steps: 3" in html


def test_summary_bounds_fold_into_their_keys_interval(run_dir):
    (run_dir / "eval.json").unlink()
    html = write_report(run_dir).read_text()
    row = '<code>eval/win_rate_gold_reward</code></td><td class="num">0.613 <span class="iv">[0.571, 0.652]</span>'
    assert row in html
    assert "eval/win_rate_gold_reward_low" not in html and "eval/win_rate_gold_reward_high" not in html


def test_every_plot_is_embedded_as_a_data_uri(run_dir):
    html = write_report(run_dir).read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 2
    assert base64.b64decode(uris[0]) == (run_dir / "plots" / "reward.png").read_bytes()
    assert "stages/irl/plots/disc.png" in html


def test_links_are_relative_and_name_the_tensorboard_command(run_dir):
    html = write_report(run_dir).read_text()
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert {"tb/", "models/policy/", "models/reward/", "config.yaml", "summary.json", "eval.json"} <= set(hrefs)
    assert all(not h.startswith(("/", "http", "file:")) and ".." not in h for h in hrefs)
    assert f"tensorboard --logdir {run_dir.resolve() / 'tb'}" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained


def test_text_from_the_run_is_escaped(run_dir):
    html = write_report(run_dir).read_text()
    assert PLANTED not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html


def test_missing_pieces_become_notes(tmp_path):
    (tmp_path / "config.yaml").write_text("stages: [rl]\n")
    html = write_report(tmp_path).read_text()
    for note in ("No summary.json", "No eval.json", "No plots", "No tb/", "No exported models"):
        assert note in html
    (tmp_path / "eval.json").write_text("{not json")
    assert "eval.json could not be read" in write_report(tmp_path).read_text()


def test_a_dir_without_config_yaml_exits_2_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "not a run dir (no config.yaml)" in err
    assert not (tmp_path / REPORT).exists()


def test_the_cli_writes_the_report_and_prints_its_path(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / REPORT)
