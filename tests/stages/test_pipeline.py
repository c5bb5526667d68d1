"""``jaxrlhf pipeline`` on the bundled tiny task, shortened: SFT -> DPO, then SFT (skipped: already
finished) -> RM -> PPO in the same run directory. The final policy's temperature-1 samples must beat the SFT
policy's under the task's ground-truth rule (same prompts, same sampling settings), report.md's numbers must
be metrics.jsonl's, and a rerun skips every finished stage. The config is checked key by key (sections
against their stage's config class) and the pipeline refuses to be told what it wires itself.

The DPO stage tests on the 150-step DPO run (``test_dpo_*``) use the DPO chain's stages: its SFT section is
the short tiny SFT stage of tests/stages/conftest.py (``tiny_sft``: the same config, 100 steps) and its DPO
section configs/tiny/dpo.yaml as shipped (150 steps, 128 samples), so they are the runs those tests would
make on their own (same metrics and samples, byte for byte), made once. On 8 fake CPU devices: the policy
learns the raters' preferences (held-out implicit-reward accuracy >= 0.8) and its temperature-1 samples score
higher under the task's ground-truth rule (which training never sees) than the SFT policy's, same prompts and
sampling key (the SFT stage's own samples: the DPO run's sampling settings, prompts and key, the runner's
``fold(3)`` of ``train.seed``); the run leaves a stage checkpoint that ``jaxrlhf generate`` loads, a HF export
that transformers scores with the same logits, and a reference cache holding the SFT policy's log-probs."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from jaxrlhf import cli, data, losses, models, train
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.stages import dpo as dpo_stage
from jaxrlhf.stages import pipeline
from tests.stages._compile_cache import module_compile_cache  # noqa: F401  (autouse: reruns load)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YAML = os.path.join(ROOT, "configs", "tiny", "pipeline.yaml")
SFT_STEPS, RM_STEPS, DPO_STEPS, PPO_ITERS = 100, 100, 150, 8
SAMPLES = 128  # the pipeline's samples section (configs/tiny/dpo.yaml's too)


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


@pytest.fixture(scope="module")
def sft_run(runs):
    """The DPO chain's SFT stage result (the tiny SFT config of tests/stages/conftest.py, 100 steps)."""
    _, dpo, _ = runs
    return dpo.stages["sft"].result


@pytest.fixture(scope="module")
def sft_samples(sft_run):
    """The SFT policy's samples: the DPO run's sampling settings, prompts and key (the pipeline's samples
    section, the runner's ``fold(3)`` of ``train.seed`` = 0 in both stages)."""
    return sft_run.samples


@pytest.fixture(scope="module")
def dpo_run(runs):
    """The DPO chain's DPO stage result: configs/tiny/dpo.yaml as shipped on the SFT stage."""
    _, dpo, _ = runs
    cfg = load_config(pipeline.PipelineConfig, os.path.join(dpo.run_dir, "config.yaml")).stage_config("dpo")
    assert cfg.optim.total_steps == DPO_STEPS and cfg.samples.sampling.temperature == 1.0
    return dpo.stages["dpo"].result


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


@pytest.mark.slow
def test_dpo_learns_preferences_and_beats_the_sft_policy(dpo_run, sft_samples):
    first, last = dpo_run.first_eval, dpo_run.eval_metrics
    # at step 0 the policy is the reference: zero implicit rewards, sigmoid loss log 2 (+ the RPO NLL term)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and first["rewards/accuracies"] == 0.0
    assert first["loss"] == pytest.approx(np.log(2) + first["nll"], rel=1e-4)
    assert last["rewards/accuracies"] >= 0.8 and last["rewards/margins"] > 0.2, last
    assert last["logps/chosen"] > first["logps/chosen"] - 0.5  # RPO keeps the chosen answers likely
    assert last["logps/rejected"] < first["logps/rejected"] - 1.0
    before, after = sft_samples, dpo_run.samples
    assert before["num"] == after["num"] == SAMPLES
    assert after["rule_score"] >= before["rule_score"] + 0.12, (before, after)
    assert after["polite"] > before["polite"] + 0.2, (before, after)
    records = train.read_jsonl(os.path.join(dpo_run.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 50, 100, 150]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert keys | {"logps/chosen", "logps/rejected", "grad_norm"} <= set(records[1]), records[1]


@pytest.mark.slow
def test_dpo_stage_checkpoint_export_and_generate(dpo_run, tmp_path):
    from jaxrlhf.stages.generate_cmd import run_generate

    ckpt = train.load_stage(dpo_run.stage_dir)
    assert ckpt.stage_info["stage"] == "dpo" and ckpt.stage_info["step"] == DPO_STEPS and ckpt.lora is None
    out = tmp_path / "gen.jsonl"
    prompts = ["What is 2 + 3?", "What is 9 - 4?"]
    argv = ["--checkpoint", dpo_run.stage_dir, "--output", str(out), "--temperature", "0"]
    run_generate([*argv, "--max-new-tokens", "20", *sum((["--prompt", p] for p in prompts), [])])
    rows = _read_jsonl(out)
    assert [r["prompt"] for r in rows] == prompts and all(r["completion"] for r in rows)
    torch = pytest.importorskip("torch")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(dpo_run.run_dir, "export", "hf"))
    tok = data.load_tokenizer(os.path.join(dpo_run.run_dir, "export", "hf"))
    ids = np.asarray([[*tok.prefix_ids, *tok.encode("What is 2 + 3? Sure! 2 + 3 = 5.")]], np.int32)
    want = models.forward(ckpt.spec, ckpt.params, ids, np.ones_like(ids)).logits
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_dpo_reference_cache_holds_the_sft_policy_logprobs(dpo_run, sft_run):
    """The precomputed reference = summed completion log-probs under the SFT weights, recomputed here
    from a plain forward pass for some held-out pairs (the split rebuilt from the run's config)."""
    files = sorted(glob.glob(os.path.join(dpo_run.run_dir, "reference", "*.npy")))
    assert [os.path.basename(f).split("-")[0] for f in files] == ["eval", "train"]
    ref = np.load(files[0])
    cfg = load_config(dpo_stage.DPOConfig, os.path.join(dpo_run.run_dir, "config.yaml"))
    ckpt = train.load_stage(sft_run.stage_dir)
    tok = data.load_tokenizer(ckpt.tokenizer_dir)
    dcfg = dataclasses.replace(cfg.data, path=dpo_stage.common.resolve_path(cfg.data.path))
    ds = data.build_dataset(dcfg, tok, "preference").eval
    assert ref.shape == (len(ds.data), 2)
    batch = data.collate([ds.data[i] for i in range(8)], ds)
    for j, side in enumerate(("chosen", "rejected")):
        ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        logits = models.forward(ckpt.spec, ckpt.params, ids, attn).logits[:, :-1]
        lp = np.asarray(losses.token_logprobs(logits, ids[:, 1:]))
        want = np.sum(lp * batch[f"{side}_loss_mask"][:, 1:], axis=1)
        np.testing.assert_allclose(ref[:8, j], want, rtol=1e-4, atol=1e-4)


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
