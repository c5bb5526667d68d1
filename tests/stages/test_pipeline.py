"""``jaxrlhf pipeline`` on the bundled tiny task, shortened: SFT -> DPO, then SFT (skipped: already
finished) -> RM -> PPO in the same run directory. The final policy's temperature-1 samples must beat the SFT
policy's under the task's ground-truth rule (same prompts, same sampling settings), report.md's numbers must
be metrics.jsonl's, and a rerun skips every finished stage. The config is checked key by key (sections
against their stage's config class) and the pipeline refuses to be told what it wires itself."""

from __future__ import annotations

import json
import os

import pytest

from jaxrlhf import cli, train
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.stages import pipeline
from tests.stages._compile_cache import module_compile_cache  # noqa: F401  (autouse: reruns load)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YAML = os.path.join(ROOT, "configs", "tiny", "pipeline.yaml")
SFT_STEPS, RM_STEPS, DPO_STEPS, PPO_ITERS = 100, 100, 150, 16


def _overrides(out, tmp_path_factory, method: str) -> list[str]:
    base = tmp_path_factory.getbasetemp()  # the tokenizer / data caches of the other stage tests
    caches = [f"{s}.data.cache_dir={base / 'tiny_data_cache'}" for s in ("sft", "rm", "dpo", "ppo")]
    quiet = [f"{s}.train.{k}=false" for s in ("sft", "rm", "dpo", "ppo") for k in ("progress", "tensorboard")]
    return [
        f"output_dir={out}", f"method={method}", f"sft.tokenizer.cache_dir={base / 'tiny_tokenizer'}",
        f"sft.optim.total_steps={SFT_STEPS}", "sft.optim.warmup_steps=10", "sft.train.eval_every=1000",
        f"rm.optim.total_steps={RM_STEPS}", "rm.train.eval_every=1000", f"dpo.optim.total_steps={DPO_STEPS}",
        f"ppo.train.iterations={PPO_ITERS}", "ppo.train.eval_every=1000", "sft.export.hf=false",
        "rm.export.hf=false", *caches, *quiet,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    dpo = pipeline.run(load_config(pipeline.PipelineConfig, YAML, _overrides(out, tmp_path_factory, "dpo")))
    ppo = pipeline.run(load_config(pipeline.PipelineConfig, YAML, _overrides(out, tmp_path_factory, "ppo")))
    return out, dpo, ppo


def _last(path, key):
    return [r[key] for r in train.read_jsonl(path) if key in r][-1]


@pytest.mark.slow
def test_final_policy_beats_sft_under_the_rule(runs):
    out, dpo, ppo = runs
    assert not dpo.interrupted and list(dpo.stages) == ["sft", "dpo"]
    assert dpo.stage_dir == os.path.join(out, "dpo", "stage") and os.path.isfile(dpo.report_path)
    assert dpo.summary["rule_score_final"] >= dpo.summary["rule_score_sft"] + 0.1, dpo.summary
    # the PPO chain reuses the finished SFT stage, trains the RM on it and PPO against that RM
    assert (
        ppo.stages["sft"].skipped
        and not ppo.stages["rm"].skipped
        and list(ppo.stages) == ["sft", "rm", "ppo"]
    )
    cfg = load_config(pipeline.PipelineConfig, os.path.join(out, "config.yaml")).stage_config("ppo")
    assert cfg.model.path == os.path.join(out, "sft", "stage") and cfg.reward.path == os.path.join(
        out, "rm", "stage"
    )
    assert ppo.summary["rule_score_final"] >= ppo.summary["rule_score_sft"] + 0.05, ppo.summary
    for stage in ("sft", "dpo", "rm", "ppo"):
        with open(os.path.join(out, stage, "stage", "stage.json")) as f:
            assert json.load(f)["stage"] == stage
    sft_samples = train.read_jsonl(os.path.join(out, "sft", "samples.jsonl"))
    ppo_samples = train.read_jsonl(os.path.join(out, "ppo", "samples.jsonl"))
    assert [s["prompt"] for s in sft_samples] == [s["prompt"] for s in ppo_samples] and len(
        sft_samples
    ) == 128


@pytest.mark.slow
def test_report_numbers_are_the_metrics(runs):
    out, _, ppo = runs
    md = open(os.path.join(out, "report.md")).read()
    s = ppo.summary["stages"]
    assert s["sft"]["eval/loss"] == _last(os.path.join(out, "sft", "metrics.jsonl"), "eval/loss")
    assert s["rm"]["eval/accuracy"] == _last(os.path.join(out, "rm", "metrics.jsonl"), "eval/accuracy")
    assert f"| eval/loss | {s['sft']['eval/loss']:.4f} |" in md
    assert f"| eval/accuracy | {s['rm']['eval/accuracy']:.4f} |" in md
    for k, v in s["ppo"].items():
        if k not in ("rule_score", "seconds"):
            assert v == _last(os.path.join(out, "ppo", "metrics.jsonl"), k) and f"| {k} | " in md
    assert any("reward" in k for k in s["ppo"]) and any("kl" in k for k in s["ppo"]), s["ppo"]
    for png in ("curves_sft.png", "curves_rm.png", "curves_ppo.png", "rl_ppo.png", "rule_score.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert "| prompt | SFT | PPO |" in md
    assert {"sft", "rm", "ppo", "dpo"} <= set(json.load(open(os.path.join(out, "pipeline.json")))["stages"])


@pytest.mark.slow
def test_rerun_skips_finished_stages(runs, tmp_path_factory):
    out, _, _ = runs
    again = pipeline.run(load_config(pipeline.PipelineConfig, YAML, _overrides(out, tmp_path_factory, "ppo")))
    assert all(o.skipped for o in again.stages.values()) and again.summary["order"] == ["sft", "rm", "ppo"]


def test_sections_are_checked_against_their_stage(tmp_path, capsys):
    args = ["pipeline", "--config", YAML, "--set", "method=dpo", f"output_dir={tmp_path}/p"]
    assert cli.main([*args, "sft.optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "--set sft.optim.lrr=1: unknown key 'sft.optim.lrr' (did you mean 'sft.optim.lr'?)" in err
    assert cli.main([*args, "dpo.train.bta=0.1"]) == 2
    assert "did you mean 'dpo.train.beta'?" in capsys.readouterr().err
    assert cli.main([*args, "dpo.model.path=/elsewhere"]) == 2
    assert "'dpo.model.path' is set by the pipeline" in capsys.readouterr().err
    assert cli.main([*args, "sft.name=x"]) == 2
    assert "'sft.name' is set by the pipeline" in capsys.readouterr().err
    assert cli.main([*args, "sft.data.max_length=many"]) == 2
    assert "key 'sft.data.max_length' expects int" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")


def test_wiring_and_chains(tmp_path):
    cfg = load_config(pipeline.PipelineConfig, YAML, [f"output_dir={tmp_path}", "sft.optim.total_steps=7"])
    assert cfg.method == "ppo" and cfg.chain() == ("sft", "rm", "ppo")
    sft = cfg.stage_config("sft")
    assert (
        sft.optim.total_steps == 7
        and sft.output_dir == str(tmp_path / "sft")
        and sft.name == "tiny-pipeline-sft"
    )
    rm, ppo = cfg.stage_config("rm"), cfg.stage_config("ppo")
    assert rm.model.path == ppo.model.path == str(tmp_path / "sft" / "stage")
    assert ppo.reward.path == str(tmp_path / "rm" / "stage")
    assert sft.samples == ppo.samples == cfg.samples  # the same prompts and sampling for before / after
    python_reward = load_config(
        pipeline.PipelineConfig, YAML, ["ppo.reward.path=null", "ppo.reward.function=tiny"]
    )
    assert python_reward.chain() == ("sft", "ppo") and python_reward.stage_config("ppo").reward.path is None
    for method in ("grpo", "rloo"):  # group-baseline stages: SFT policy, the RM stage as reward
        group = load_config(pipeline.PipelineConfig, YAML, [f"output_dir={tmp_path}", f"method={method}"])
        assert group.chain() == ("sft", "rm", method)
        stage = group.stage_config(method)
        assert type(stage).__name__ == f"{method.upper()}Config" and stage.name == f"tiny-pipeline-{method}"
        assert stage.model.path == str(tmp_path / "sft" / "stage")
        assert stage.reward.path == str(tmp_path / "rm" / "stage")
    with pytest.raises(ConfigError, match="method=dpo runs the 'dpo' stage: add a 'dpo' section"):
        pipeline.PipelineConfig(method="dpo", sft={"data": {"path": "tiny:sft.jsonl"}})


def test_finished_stage_detection_and_half_made_dirs(tmp_path):
    cfg = load_config(pipeline.PipelineConfig, YAML, [f"output_dir={tmp_path}", "sft.optim.total_steps=7"])
    sft = cfg.stage_config("sft")
    assert not pipeline.is_finished(sft)
    os.makedirs(tmp_path / "sft" / "stage")
    info = {"stage": "sft", "step": 7, "config": __import__("jaxrlhf").config.to_dict(sft)}
    with open(tmp_path / "sft" / "stage" / "stage.json", "w") as f:
        json.dump(info, f)
    assert pipeline.is_finished(sft)
    assert not pipeline.is_finished(
        cfg.__class__(**{**cfg.__dict__, "sft": {**cfg.sft, "optim": {"total_steps": 8}}}).stage_config("sft")
    )
    changed = load_config(
        pipeline.PipelineConfig,
        YAML,
        [f"output_dir={tmp_path}", "sft.optim.total_steps=7", "sft.optim.lr=0.5"],
    )
    assert not pipeline.is_finished(changed.stage_config("sft"))  # same steps, another config: rerun it
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("x")
    (half / "run.json").write_text("{}")
    assert not pipeline.remove_half_made_run_dir(str(half), existed=True) and half.exists()
    assert pipeline.remove_half_made_run_dir(str(half), existed=False) and not half.exists()
    assert not pipeline.remove_half_made_run_dir(str(tmp_path / "sft"), existed=False)  # holds a stage
