"""The ``jaxrlhf`` command: a short SFT run in a subprocess, config errors, dispatch, multi-host init."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from jaxrlhf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny", "sft.yaml")


def test_sft_subprocess_writes_stage_checkpoint_and_metrics(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "jaxrlhf",
        "sft",
        "--config",
        TINY,
        "--set",
        f"output_dir={out}",
        "optim.total_steps=4",
        "optim.warmup_steps=0",
        "train.log_every=2",
        "checkpoint.every=2",
        "optim.grad_accum=2",
        "data.eval_fraction=0",
        "samples.num=0",
        "export.hf=false",
        "train.progress=false",
        "--set",
        f"tokenizer.cache_dir={base / 'tiny_tokenizer'}",
        f"data.cache_dir={base / 'tiny_data_cache'}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's plain 1-device CPU run
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "stage" / "stage.json") as f:
        info = json.load(f)
    assert info["stage"] == "sft" and info["step"] == 4
    assert os.path.isdir(out / "stage" / "params") and os.path.isfile(out / "stage" / "spec.json")
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert all(r["loss"] > 0 for r in records if "loss" in r)
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["optim"]["total_steps"] == 4 and saved["data"]["eval_fraction"] == 0.0


def test_config_errors_exit_2_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: tiny:sft.jsonl\noptim:\n  lrr: 0.1\n")
    assert cli.main(["sft", "--config", str(bad)]) == 2
    assert f"{bad}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
    assert cli.main(["sft", "--config", TINY, "--set", "optim.total_steps=many"]) == 2
    assert "key 'optim.total_steps' expects int, got str 'many'" in capsys.readouterr().err
    assert cli.main(["sft", "--config", TINY, "--set", "train.eval_evry=5"]) == 2
    err = capsys.readouterr().err
    assert "--set train.eval_evry=5: unknown key 'train.eval_evry' (did you mean 'train.eval_every'?)" in err


def test_print_config_applies_overrides(capsys):
    assert cli.main(["sft", "--config", TINY, "--set", "optim.lr=0.5", "lora.rank=4", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.5 and cfg["lora"]["rank"] == 4 and cfg["lora"]["alpha"] == 16.0
    assert cfg["model"]["spec"]["hidden_size"] == 128  # untouched keys keep the file's values


def test_unavailable_stage_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(cli.STAGES, "ppo", ("jaxrlhf.stages.no_such_stage", ("PPOConfig",), "PPO"))
    with pytest.raises(SystemExit, match="stage 'ppo' is not available"):
        cli.main(["ppo", "--config", TINY])


def test_generate_passes_its_arguments_through(monkeypatch):
    from jaxrlhf.stages import generate_cmd

    seen = []
    monkeypatch.setattr(generate_cmd, "run_generate", lambda argv: seen.append(argv) or 0)
    assert cli.main(["generate", "--checkpoint", "runs/x/stage", "--prompt", "hi", "--temperature", "0"]) == 0
    assert seen == [["--checkpoint", "runs/x/stage", "--prompt", "hi", "--temperature", "0"]]


def test_distributed_initialization_from_environment(monkeypatch):
    import jax

    assert not cli.wants_distributed(False, {})
    assert cli.wants_distributed(True, {})
    assert cli.wants_distributed(False, {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert cli.wants_distributed(False, {"JAXRLHF_DISTRIBUTED": "1"})
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cli.init_distributed(
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    )
    cli.init_distributed({})  # TPU pods: everything auto-detected
    assert calls == [dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3), {}]


def test_stage_help_lists_every_key_with_type_default_and_doc(capsys):
    from jaxrlhf import _cli_help
    from jaxrlhf.stages import sft

    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "jaxrlhf sft --config configs/tiny/sft.yaml" in out  # the example, as written
    for key, tp, default, _ in _cli_help.config_rows(sft.SFTConfig):
        assert f"  {key}" in out and f"{tp}, default {default}" in out, key
    assert "optim.total_steps" in out and "int, default 1000" in out
    assert "checkpoint.resume" in out and "Continue from the latest one" in out  # doc from the docstring
    assert "``" not in out and ":class:" not in out  # no raw RST markup


def test_user_errors_exit_2_and_leave_no_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["rm", "--config", os.path.join(ROOT, "configs", "tiny", "rm.yaml"), "--set", f"output_dir={out}"]
    assert cli.main([*args, "model.path=./no/such/stage"]) == 2
    assert "model.path: ./no/such/stage does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_half_made_run_dir_removed_after_a_failed_run(tmp_path, capsys, monkeypatch):
    from jaxrlhf.data.errors import DataError
    from jaxrlhf.stages import sft

    out = tmp_path / "run"

    def failing_run(config):
        os.makedirs(out)
        (out / "config.yaml").write_text("x")
        (out / "run.json").write_text("{}")
        raise DataError("bad row", file="x.jsonl", row=3)

    monkeypatch.setattr(sft, "run", failing_run)
    assert cli.main(["sft", "--config", TINY, "--set", f"output_dir={out}"]) == 2
    assert "bad row" in capsys.readouterr().err and not out.exists()


def test_interrupted_stage_exits_130(tmp_path, capsys, monkeypatch):
    from jaxrlhf.stages import sft

    monkeypatch.setattr(sft, "run", lambda config: sft.SFTResult(str(tmp_path), "", {}, {}, {}, {}))
    assert cli.main(["sft", "--config", TINY, "--set", f"output_dir={tmp_path}"]) == 130
    assert "interrupted" in capsys.readouterr().err
