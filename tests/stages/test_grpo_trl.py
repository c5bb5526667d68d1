"""GRPO and RLOO against TRL's own GRPOTrainer / RLOOTrainer (trl 1.16, torch CPU), run in the test.

A tiny random Llama (and a word-level tokenizer) is built and saved with transformers. Each TRL trainer is
constructed on that directory (``use_vllm=False``, ``report_to="none"``; with ``beta > 0`` it reloads its
reference model from the directory) and its weights are then perturbed in memory, so policy and reference
differ. Its generation is replaced by fixed completions (``_generate_single_turn``) and its reward functions
return fixed rewards (with ``None`` entries: unscorable rows); TRL's own ``_generate_and_score_completions``
then computes the advantages, and TRL's own ``_compute_loss`` the loss of that batch (with old log-probs
moved off the current ones so that clipping happens). jaxrlhf loads the same two weight sets with
``models.load_pretrained``, scores the same token ids with ``rl.completion_logprobs`` and computes:

- the advantages with ``rl.group_advantages`` (the update's step 1-2) from a ``Rollout`` of those
  completions and reward terms: GRPO with scale_rewards group / batch / none, RLOO with its KL-in-reward
  (beta), ``normalize_advantages`` and ``reward_clip_range``;
- the loss with ``rl.make_grpo_loss`` (the update's micro-batch loss) for every TRL loss type, token and
  sequence importance sampling, beta, delta, the entropy bonus, and two micro-batches of gradient
  accumulation (TRL's per-micro-batch losses, summed, = jaxrlhf's shares, summed).

Everything must agree to 1e-4 (f32).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import models, rl

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.slow  # ~40 s on 2 cores (several TRL trainers on a tiny model)

G = 4  # completions per prompt
PROMPTS = ["t5 t6 t7 t8 t9", "t10 t11 t12", "t13 t14 t15 t16"]
EOS, PAD, VOCAB, MAX_NEW = 1, 2, 48, 7
TEMPERATURE = 0.8
# fixed completions (token ids); rows ending with EOS stop, the others are truncated
COMPLETIONS = [
    [20, 21, 22, EOS], [23, 24], [25, 26, 27, 28, 29, 30, 31], [32, EOS],
    [33, 34, 35, 36, EOS], [37], [38, 39, 40, 41, 42, 43, EOS], [44, 45, 46],
    [20, 30, EOS], [21, 31, 41, 11, EOS], [22, EOS], [40, 41, 42, 43, 44, 45, 46],
]  # fmt: skip
# two reward functions (weights 1 and 0.5); None = "not applicable" (row 5: unscorable by both); group 3 has
# zero std after weighting
R1 = [1.0, 0.0, 0.5, 2.0, None, None, 1.0, -1.0, 0.3, 0.3, 0.3, 0.3]
R2 = [0.2, None, 1.0, -0.4, 1.0, None, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
WEIGHTS = (1.0, 0.5)


def fixed_a(prompts, completions, **kw):
    assert len(completions) == len(R1)
    return list(R1)


def fixed_b(prompts, completions, **kw):
    return list(R2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm

    d = str(tmp_path_factory.mktemp("grpo_trl") / "model")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=EOS, pad_token_id=PAD, attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(d)
    tk = Tokenizer(tm.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="t0", eos_token="t1", pad_token="t2", unk_token="t3"
    )
    tok.save_pretrained(d)
    return d


def _trainer(kind, model_dir, out, **kw):
    import datasets
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    common = dict(
        output_dir=str(out), use_cpu=True, report_to="none", num_generations=G, max_completion_length=MAX_NEW,
        per_device_train_batch_size=G * len(PROMPTS), temperature=TEMPERATURE, bf16=False, seed=0,
        save_strategy="no", disable_dropout=True,
    )  # fmt: skip
    if kind == "grpo":
        args = trl.GRPOConfig(**common, use_vllm=False, reward_weights=list(WEIGHTS), **kw)
        cls = trl.GRPOTrainer
    else:
        args = trl.RLOOConfig(**common, use_vllm=False, reward_weights=list(WEIGHTS), **kw)
        cls = trl.RLOOTrainer
    ds = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = cls(model=model_dir, reward_funcs=[fixed_a, fixed_b], args=args, train_dataset=ds,
                  processing_class=tok)  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves off the reference (which TRL reloaded from model_dir)
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fixed = [list(c) for c in COMPLETIONS]
    if kind == "grpo":
        trainer._generate_single_turn = lambda prompt_ids, *a, **k: ([list(c) for c in fixed], None)
    else:
        trainer._generate_single_turn = lambda prompt_ids, *a, **k: [list(c) for c in fixed]
    trainer.model.train()
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    policy_dir = os.path.join(trainer.args.output_dir, "policy")
    trainer.model.save_pretrained(policy_dir)
    return trainer, out, policy_dir


def _np(t):
    return t.detach().cpu().numpy()


def _rollout(out, spec, policy, ref):
    """The jaxrlhf Rollout of TRL's batch: its token ids, jaxrlhf's log-probs, the fixed reward terms."""
    prompt_ids, prompt_mask = _np(out["prompt_ids"]), _np(out["prompt_mask"]) > 0
    tokens, mask = _np(out["completion_ids"]), _np(out["completion_mask"]).astype(np.float32)
    lp = jax.jit(lambda p, *a: rl.completion_logprobs(spec, p, *a, temperature=TEMPERATURE))
    logprobs = np.asarray(lp(policy, prompt_ids, prompt_mask, tokens, mask))
    ref_logprobs = np.asarray(lp(ref, prompt_ids, prompt_mask, tokens, mask))
    terms = np.array([[np.nan if x is None else x for x in col] for col in (R1, R2)], np.float32).T
    scores = np.nansum(terms * np.asarray(WEIGHTS, np.float32), axis=1)  # the rollout's weighted nan-sum
    ended = np.array([c[-1] == EOS for c in COMPLETIONS])
    zeros = np.zeros(len(COMPLETIONS), np.float32)
    return rl.Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens, mask=mask, logprobs=logprobs,
        ref_logprobs=ref_logprobs, values=np.zeros_like(mask), scores=scores, ended=ended, raw_scores=zeros,
        reward_terms=terms, lengths=mask.sum(1).astype(np.int32),
    )  # fmt: skip


@pytest.fixture(scope="module")
def grpo_setup(model_dir, tmp_path_factory):
    trainer, out, policy_dir = _trainer("grpo", model_dir, tmp_path_factory.mktemp("grpo"), beta=0.04)
    spec, ref = models.load_pretrained(model_dir)
    _, policy = models.load_pretrained(policy_dir)
    return trainer, out, spec, policy, _rollout(out, spec, policy, ref)


def test_same_batch_and_log_probs(grpo_setup):
    trainer, out, spec, policy, ro = grpo_setup
    assert [list(r[m > 0]) for r, m in zip(ro.tokens, ro.mask, strict=True)] == COMPLETIONS
    # TRL's reference log-probs (reloaded model, fused LM head at the temperature) = jaxrlhf's
    np.testing.assert_allclose(ro.ref_logprobs, _np(out["ref_per_token_logps"]) * ro.mask, atol=1e-4)
    assert np.max(np.abs(ro.logprobs - ro.ref_logprobs)) > 1e-2  # policy and reference really differ


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(model_dir, tmp_path_factory, grpo_setup, scale):
    ro = grpo_setup[4]
    trainer, out, _ = _trainer(
        "grpo", model_dir, tmp_path_factory.mktemp(f"adv_{scale}"), scale_rewards=scale
    )
    hp = rl.GRPOHyperParams(num_generations=G, scale_rewards=scale)
    adv, m = jax.jit(rl.group_advantages, static_argnums=1)(ro, hp)
    expected = _np(out["advantages"])
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-4, atol=1e-4)
    assert expected[5] == 0.0 and np.count_nonzero(expected) >= 6  # the unscorable row; not vacuous
    tm = out_metrics(trainer)
    np.testing.assert_allclose(float(m["reward_mean"]), tm["reward"], rtol=1e-5)
    np.testing.assert_allclose(float(m["reward_std"]), tm["reward_std"], rtol=1e-5)
    if scale != "batch":  # TRL's zero-std flag uses the batch std under scale=batch; ours is per group
        np.testing.assert_allclose(float(m["frac_reward_zero_std"]), tm["frac_reward_zero_std"], atol=1e-6)
        assert tm["frac_reward_zero_std"] > 0


def out_metrics(trainer):
    return {k: v[-1] for k, v in trainer._metrics["train"].items() if v}


@pytest.mark.parametrize(
    "kw",
    [dict(beta=0.05), dict(beta=0.05, normalize_advantages=True), dict(beta=0, reward_clip_range=(-0.5, 1))],
    ids=["beta", "normalized", "clipped"],
)  # fmt: skip
def test_rloo_advantages_match_trl(model_dir, tmp_path_factory, kw):
    trainer, out, policy_dir = _trainer("rloo", model_dir, tmp_path_factory.mktemp("rloo"), **kw)
    spec, ref = models.load_pretrained(model_dir)
    _, policy = models.load_pretrained(policy_dir)
    ro = _rollout(out, spec, policy, ref)
    np.testing.assert_allclose(  # TRL's old sequence log-probs = jaxrlhf's
        ro.logprobs.sum(1), _np(out["old_logps"]), rtol=1e-4, atol=1e-4
    )
    hp = rl.GRPOHyperParams(
        advantage="rloo", loss_type="rloo", num_generations=G, beta=kw["beta"],
        normalize_advantages=kw.get("normalize_advantages", False),
        reward_clip_range=kw.get("reward_clip_range"),
    )  # fmt: skip
    adv, m = jax.jit(rl.group_advantages, static_argnums=1)(ro, hp)
    np.testing.assert_allclose(np.asarray(adv), _np(out["advantages"]), rtol=1e-4, atol=1e-4)
    tm = out_metrics(trainer)
    np.testing.assert_allclose(float(m["frac_reward_zero_std"]), tm["frac_reward_zero_std"], atol=1e-6)
    if kw["beta"]:
        assert abs(float(m["kl_ref"])) > 1e-3


def _split(d, k, i):
    rows = d["completion_ids"].shape[0]
    s = slice(i * rows // k, (i + 1) * rows // k)
    return {
        key: (v[s] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v)
        for key, v in d.items()
    }


def _old_logprobs(ro, seed):
    rng = np.random.default_rng(seed)
    return (ro.logprobs + rng.normal(0, 0.3, ro.logprobs.shape).astype(np.float32)) * ro.mask


def _batch(ro, adv, old, rows):
    return {
        "prompt_ids": ro.prompt_ids[rows], "prompt_mask": ro.prompt_mask[rows], "tokens": ro.tokens[rows],
        "mask": ro.mask[rows], "loss_mask": ro.mask[rows], "logprobs": old[rows],
        "ref_logprobs": ro.ref_logprobs[rows], "advantages": adv[rows],
    }  # fmt: skip


def _jax_loss(spec, policy, hp, ro, adv, old, k):
    loss_fn = jax.jit(rl.make_grpo_loss(spec, hp))
    rows = len(COMPLETIONS)
    dapo = max(float(ro.mask.sum()), 1.0)  # one optimizer step per rollout
    total, metrics = 0.0, []
    for i in range(k):
        idx = np.arange(i * rows // k, (i + 1) * rows // k)
        norms = {"tokens": jnp.float32(ro.mask.sum()), "seqs": jnp.float32(rows), "dapo": jnp.float32(dapo)}
        loss, m = loss_fn(policy, None, _batch(ro, adv, old, idx), norms, jax.random.PRNGKey(0))
        total += float(loss)
        metrics.append(m)
    return total, jax.tree.map(lambda *x: float(sum(x)), *metrics)


GRPO_CASES = [
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}),
    ("luspo", {"importance_sampling_level": "sequence"}),
    ("grpo", {"importance_sampling_level": "sequence"}), ("cispo", {"epsilon_high": 1.3}), ("sapo", {}),
    ("dapo", {"epsilon_high": 0.28, "delta": 1.5}), ("grpo", {"entropy_coef": 0.1}),
]  # fmt: skip


@pytest.mark.parametrize("k", [1, 2], ids=["one_micro", "two_micro"])
@pytest.mark.parametrize(
    "loss_type,extra", GRPO_CASES, ids=[f"{a}-{'-'.join(b) or 'plain'}" for a, b in GRPO_CASES]
)
def test_grpo_loss_matches_trl(grpo_setup, loss_type, extra, k):
    trainer, out, spec, policy, ro = grpo_setup
    level = extra.get("importance_sampling_level", "token")
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    trainer.epsilon_high = extra.get("epsilon_high", 0.2)
    trainer.args.delta = extra.get("delta")
    trainer.entropy_coef = extra.get("entropy_coef", 0.0)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
    trainer.current_gradient_accumulation_steps = k
    trainer.args.steps_per_generation = k
    old = _old_logprobs(ro, 0)
    inputs = dict(out, old_per_token_logps=torch.from_numpy(old))
    theirs = 0.0
    for i in range(k):
        theirs += float(trainer._compute_loss(trainer.model, _split(inputs, k, i)))
    hp = rl.GRPOHyperParams(
        num_generations=G, loss_type=loss_type, beta=0.04, epsilon_high=extra.get("epsilon_high"),
        delta=extra.get("delta"), importance_sampling_level=level,
        entropy_coef=extra.get("entropy_coef", 0.0),
        grad_accum=k, max_completion_length=MAX_NEW, temperature=TEMPERATURE,
    )  # fmt: skip
    adv = _np(out["advantages"])
    mine, m = _jax_loss(spec, policy, hp, ro, adv, old, k)
    assert math.isfinite(theirs) and abs(theirs) > 1e-3
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    if k == 1:  # TRL logs each micro-batch's own means
        tm = out_metrics(trainer)
        np.testing.assert_allclose(m["kl"], tm["kl"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(m["entropy"], tm["entropy"], rtol=1e-4, atol=1e-6)
        if loss_type not in ("cispo", "sapo"):
            np.testing.assert_allclose(m["clipfrac"], tm["clip_ratio/region_mean"], atol=1e-6)
    if loss_type not in ("cispo", "sapo") and level == "token":
        assert m["clipfrac"] > 0  # clipping happened


@pytest.mark.parametrize("k", [1, 2], ids=["one_micro", "two_micro"])
def test_rloo_loss_matches_trl(model_dir, tmp_path_factory, k):
    trainer, out, policy_dir = _trainer("rloo", model_dir, tmp_path_factory.mktemp("rloo_loss"), beta=0.05)
    spec, ref = models.load_pretrained(model_dir)
    _, policy = models.load_pretrained(policy_dir)
    ro = _rollout(out, spec, policy, ref)
    old = _old_logprobs(ro, 1) * 0.6 + ro.logprobs * 0.4  # sequence ratios around the clip range
    inputs = dict(out, old_logps=torch.from_numpy(old.sum(1)))
    theirs = sum(float(trainer._compute_loss(trainer.model, _split(inputs, k, i))) for i in range(k)) / k
    hp = rl.GRPOHyperParams(advantage="rloo", loss_type="rloo", num_generations=G, beta=0.05, grad_accum=k,
                            temperature=TEMPERATURE)  # fmt: skip
    mine, m = _jax_loss(spec, policy, hp, ro, _np(out["advantages"]), old, k)
    assert abs(theirs) > 1e-3
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)  # HF's Trainer divides RLOO's by k
    tm = out_metrics(trainer)
    region = np.mean(trainer._metrics["train"]["clip_ratio/region_mean"][-k:])  # per-sequence clip flags
    np.testing.assert_allclose(m["clipfrac"], region, atol=1e-6)
    assert 0 < m["clipfrac"] < 1 and tm
