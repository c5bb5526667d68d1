"""The run report from run directories alone: numbers in report.md equal the last values of metrics.jsonl,
plots are valid PNGs drawn for whatever keys a stage logs (RL reward / KL keys found by name), the rule
scores before / after are the means of samples.jsonl, and sample answers sit side by side by prompt."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.stages import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(run, stage, metrics, samples=None, temperature=1.0):
    d = run / stage
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in metrics)
    if samples is not None:
        with open(d / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in samples)
    cfg = {"name": stage, "samples": {"sampling": {"temperature": temperature, "max_new_tokens": 8}}}
    with open(d / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "pipe"
    prompts = [f"What is {i} + 1?" for i in range(6)]
    sft_metrics = [{"step": s, "loss": 3.0 / s, "grad_norm": 1.0, "lr": 1e-3} for s in range(10, 101, 10)]
    sft_metrics += [{"step": 0, "eval/loss": 5.0}, {"step": 100, "eval/loss": 0.123456, "eval/accuracy": 0.9}]
    sft_samples = [
        {"prompt": p, "completion": f"{i} terse", "rule_score": 0.5} for i, p in enumerate(prompts)
    ]
    _write(run, "sft", sft_metrics, sft_samples, temperature=0.0)
    rm_metrics = [{"step": s, "loss": 0.7 - s / 1000, "accuracy": 0.8} for s in range(10, 51, 10)]
    rm_metrics += [{"step": 50, "eval/accuracy": 0.91234, "eval/margin": 1.5}]
    _write(run, "rm", rm_metrics)
    # an RL stage with keys of its own choosing: the report finds reward and KL by name
    ppo_metrics = [
        {
            "step": i,
            "reward/score_mean": float(rng.normal() + i / 10),
            "kl/policy_ref": 0.01 * i,
            "kl_coef": 0.05,
        }
        for i in range(1, 21)
    ]
    ppo_samples = [
        {"prompt": p, "completion": f"Sure! {i} | polite", "rule_score": 1.0 if i % 2 else 0.5}
        for i, p in enumerate(reversed(prompts))
    ]
    _write(run, "ppo", ppo_metrics, ppo_samples)
    with open(run / "pipeline.json", "w") as f:
        json.dump({"stages": {"sft": {"seconds": 12.5}, "rm": {"seconds": 7.0}, "ppo": {"seconds": 30.2}}}, f)
    return run


def test_numbers_match_metrics_and_samples(run_dir):
    summary = report.write_report(str(run_dir))
    md = (run_dir / "report.md").read_text()
    assert summary["order"] == ["sft", "rm", "ppo"] and summary["final"] == "ppo"
    assert summary["stages"]["sft"]["eval/loss"] == 0.123456 and "| eval/loss | 0.1235 |" in md
    assert summary["stages"]["rm"]["eval/accuracy"] == 0.91234 and "| eval/accuracy | 0.9123 |" in md
    ppo_last = json.loads((run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["stages"]["ppo"]["reward/score_mean"] == ppo_last["reward/score_mean"]
    assert summary["stages"]["ppo"]["kl/policy_ref"] == pytest.approx(0.2)
    assert f"| reward/score_mean | {ppo_last['reward/score_mean']:.4f} |" in md
    assert summary["rule_score_sft"] == 0.5 and summary["rule_score_final"] == 0.75
    assert "SFT 0.5000 -> PPO 0.7500 (+0.2500)" in md
    assert "| sft | 12 | eval/loss" in md and "| ppo | 30 |" in md
    table = report.format_summary(summary)
    assert "rule score: SFT 0.5000 -> ppo 0.7500 (+0.2500)" in table and "12s" in table


def test_plots_are_valid_pngs_of_the_logged_keys(run_dir):
    import matplotlib.image as mpimg

    report.write_report(str(run_dir))
    md = (run_dir / "report.md").read_text()
    for name in ("curves_sft.png", "curves_rm.png", "curves_ppo.png", "rl_ppo.png", "rule_score.png"):
        path = run_dir / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0, name
        assert f"({name})" in md
    assert not (run_dir / "rl_sft.png").exists()


def test_samples_side_by_side_by_prompt_with_sampling_labels(run_dir):
    report.write_report(str(run_dir))
    md = (run_dir / "report.md").read_text()
    assert "SFT greedy, PPO sampled (T=1)" in md
    # prompts are matched by text (the PPO file is in reverse order); pipes escaped
    assert "| What is 0 + 1? | 0 terse *(0.50)* | Sure! 5 \\| polite *(1.00)* |" in md


def test_report_command_rewrites_and_refuses_an_empty_dir(run_dir, tmp_path, capsys):
    assert cli.main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "rule score: SFT 0.5000 -> ppo 0.7500" in out and os.path.isfile(run_dir / "report.md")
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no stage run directories" in capsys.readouterr().err
