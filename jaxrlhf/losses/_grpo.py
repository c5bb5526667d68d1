"""Group-baseline policy gradients as TRL 1.16 computes them: GRPO (``GRPOTrainer``), RLOO (``RLOOTrainer``).

Rewards come in groups of G completions of the same prompt, prompt-major ([B*G]: the G completions of prompt
b at rows b*G .. b*G+G-1). ``valid`` marks scorable rows (TRL: a row whose every reward function returned
None is unscorable: it is left out of every mean / std below and its advantage is 0). With per-group
nan-aware mean mu_g and std s_g (Bessel's correction, like ``torch.std``; undefined for < 2 valid rows):

    GRPO    A_i = r_i - mu_g                       scale="none" (Dr. GRPO)
            A_i = (r_i - mu_g) / (s_g + 1e-4)      scale="group" (GRPO)
            A_i = (r_i - mu_g) / (s + 1e-4)        scale="batch" (s: the std of every reward of the batch)
    RLOO    A_i = r_i - (sum_g r - r_i) / (n_g - 1)       (leave-one-out baseline over the n_g valid rows)
            then, with ``normalize``, A <- (A - mean(A)) / (std(A) + 1e-4) over the batch

and an undefined advantage (a single valid row in its group, an unscorable row) is 0.

Per-token loss with rho = exp(log pi - log pi_old) (``importance_sampling_level="sequence"``, GSPO: one
rho per sequence, exp of the masked mean log-ratio), eps = (eps_low, eps_high) and A one per sequence:

    grpo, bnpo, dr_grpo, dapo, luspo   l = -min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    cispo                              l = -sg(min(rho, eps_high)) A log pi
    sapo                               l = -sigmoid(tau (rho - 1)) 4 / tau A,  tau = tau_+ (A > 0) or tau_-
    + beta * k3 [* rho],   k3 = exp(log ref - log pi) - (log ref - log pi) - 1    (when beta != 0; the rho
                           factor: ``use_bias_correction_kl``, TRL's default, DeepSeek-V3.2's unbiased KL)

aggregated over a micro-batch of n rows (mask m, K micro-batches per optimizer step, L =
max_completion_length, D = the token normaliser of the DAPO family), so the K micro-batch losses add up to
the optimizer step's loss, exactly as TRL divides by its gradient-accumulation steps:

    grpo, sapo    sum_r [sum_t m l / max(sum_t m, 1)] / (n K)
    bnpo          sum m l / max(sum m, 1) / K                (the micro-batch's own token count)
    dr_grpo       sum m l / (n L K)
    dapo, cispo   sum m l / D        D = max(tokens of the whole rollout, 1) / optimizer steps per rollout
    luspo         sum_r sum_t m l / (n K)

RLOO (``loss_type="rloo"``) is sequence-level: rho = exp(sum_t m (log pi - log pi_old)), one clipped term
per sequence, ``sum_r l_r / (n K)``; its KL to the reference is a reward penalty instead (the stage's
``beta * sum_t m (log pi_old - log ref)`` subtracted from r before the baseline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._kl import kl_penalty

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "rloo")
# the aggregations by their older names (seq_mean = grpo, token_mean = bnpo) and every TRL loss type
GRPO_LOSS_AGGREGATIONS = ("seq_mean", "token_mean", *GRPO_LOSS_TYPES)
_ALIASES = {"seq_mean": "grpo", "token_mean": "bnpo"}
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
EPS = 1e-4


def _groups(rewards: jax.Array, group_size: int, valid: jax.Array | None, what: str):
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{what}: rewards {rewards.shape} is not [B * group_size={group_size}]")
    r = rewards.astype(jnp.float32)
    v = jnp.isfinite(r) if valid is None else (valid.astype(bool) & jnp.isfinite(r))
    return jnp.where(v, r, 0.0).reshape(-1, group_size), v.reshape(-1, group_size)


def _nan_mean_std(r: jax.Array, v: jax.Array, axis=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, Bessel std, count) over the valid entries; NaN where undefined (torch.nanmean / TRL nanstd)."""
    vf = v.astype(jnp.float32)
    n = jnp.sum(vf, axis=axis, keepdims=True)
    mean = jnp.sum(r * vf, axis=axis, keepdims=True) / jnp.where(n > 0, n, jnp.nan)
    var = jnp.sum(jnp.square(jnp.where(v, r - mean, 0.0)), axis=axis, keepdims=True) / jnp.where(
        n > 1, n - 1, jnp.nan
    )
    return mean, jnp.sqrt(var), n


def group_reward_std(rewards: jax.Array, group_size: int, *, valid: jax.Array | None = None) -> jax.Array:
    """Per-group reward std [B] (Bessel; NaN for groups with < 2 valid rows)."""
    r, v = _groups(rewards, group_size, valid, "group_reward_std")
    return _nan_mean_std(r, v, axis=1)[1][:, 0]


def grpo_advantages(
    rewards: jax.Array,  # [B*G]
    group_size: int,
    *,
    scale: bool | str = "group",
    valid: jax.Array | None = None,  # [B*G] bool, scorable rows (default: finite rewards)
    eps: float = EPS,
) -> jax.Array:
    """GRPO advantages [B*G] (module docstring). ``scale``: "group" (True), "batch" or "none" (False)."""
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"grpo_advantages: scale must be one of {SCALE_REWARDS} (or a bool), got {scale!r}")
    if group_size < 2 and scale == "group":
        raise ValueError("grpo_advantages: group_size must be >= 2 to scale by the group std")
    r, v = _groups(rewards, group_size, valid, "grpo_advantages")
    mean, std, _ = _nan_mean_std(r, v, axis=1)
    adv = r - mean
    if scale == "batch":
        std = _nan_mean_std(r, v)[1]
    if scale != "none":
        adv = adv / (std + eps)
    adv = jnp.where(v & jnp.isfinite(adv), adv, 0.0)
    return jax.lax.stop_gradient(adv.reshape(-1))


def rloo_advantages(
    rewards: jax.Array,  # [B*G]
    group_size: int,
    *,
    normalize: bool = False,
    valid: jax.Array | None = None,
    eps: float = EPS,
) -> jax.Array:
    """RLOO advantages [B*G]: reward minus the mean of the other valid rows of its group (module docstring);
    ``normalize``: then whitened over the batch's defined advantages (TRL ``normalize_advantages``)."""
    r, v = _groups(rewards, group_size, valid, "rloo_advantages")
    if group_size < 2:
        return jnp.zeros(rewards.shape, jnp.float32)
    vf = v.astype(jnp.float32)
    n = jnp.sum(vf, axis=1, keepdims=True)
    total = jnp.sum(r * vf, axis=1, keepdims=True)
    defined = v & (n > 1)
    adv = jnp.where(defined, r - (total - r) / jnp.maximum(n - 1, 1.0), 0.0)
    if normalize:
        mean, std, _ = _nan_mean_std(adv, defined)
        adv = jnp.where(defined, (adv - mean) / (std + eps), 0.0)
        adv = jnp.where(jnp.isfinite(adv), adv, 0.0)
    return jax.lax.stop_gradient(adv.reshape(-1))


def importance_weights(
    logprobs: jax.Array,  # [N, T]
    old_logprobs: jax.Array,  # [N, T]
    mask: jax.Array,  # [N, T]
    *,
    level: str = "token",
) -> jax.Array:
    """rho = pi / pi_old, differentiable in ``logprobs``: per token [N, T] (``token``), exp of the masked mean
    log-ratio [N, 1] (``sequence``, GSPO) or exp of the summed log-ratio [N, 1] (``rloo``)."""
    m = mask.astype(jnp.float32)
    lp = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    if level == "rloo":
        return jnp.exp(jnp.sum(lp * m, axis=1, keepdims=True) - jnp.sum(old * m, axis=1, keepdims=True))
    if level == "sequence":
        n = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
        return jnp.exp(jnp.sum((lp - old) * m, axis=1, keepdims=True) / n)
    if level == "token":
        return jnp.exp(lp - old)
    raise ValueError(f"importance sampling level must be token / sequence / rloo, got {level!r}")


def grpo_token_terms(
    logprobs: jax.Array,  # [N, T] current policy
    old_logprobs: jax.Array,  # [N, T] sampling policy
    advantages: jax.Array,  # [N]
    mask: jax.Array,  # [N, T]
    *,
    loss_type: str = "dapo",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token policy losses [N, T] (``rloo``: per-sequence [N, 1]) before the KL term and aggregation, and
    ``{"ratio", "low_clipped", "high_clipped"}`` ([N, T], or [N, 1] at sequence level) for the metrics."""
    loss_type = _ALIASES.get(loss_type, loss_type)
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    low, high = clip_eps, clip_eps if clip_eps_high is None else clip_eps_high
    lp = logprobs.astype(jnp.float32)
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
    level = "rloo" if loss_type == "rloo" else importance_sampling_level
    coef_1 = importance_weights(logprobs, old_logprobs, mask, level=level)
    if loss_type == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(coef_1, high)) * adv * lp
    elif loss_type == "sapo":
        tau = jnp.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -jax.nn.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau * adv
    else:
        coef_2 = jnp.clip(coef_1, 1.0 - low, 1.0 + high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)
        per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    stats = {
        "ratio": coef_1,
        "low_clipped": ((coef_1 < 1.0 - low) & (adv < 0)).astype(jnp.float32),
        "high_clipped": ((coef_1 > (high if loss_type == "cispo" else 1.0 + high)) & (adv > 0)).astype(
            jnp.float32
        ),
    }
    return per_token, jax.lax.stop_gradient(stats)


def grpo_aggregate(
    per_token: jax.Array,  # [n, T] (or [n, 1] for rloo)
    mask: jax.Array,  # [n, T]
    *,
    loss_type: str,
    micro_batches: int = 1,
    max_completion_length: int | None = None,
    token_normalizer: jax.Array | float | None = None,
) -> jax.Array:
    """The micro-batch's share of the optimizer step's loss (module docstring). ``token_normalizer``: D of
    dapo / cispo (default: this micro-batch's valid tokens); ``max_completion_length``: L of dr_grpo
    (default: T)."""
    loss_type = _ALIASES.get(loss_type, loss_type)
    m = mask.astype(jnp.float32)
    n, k = per_token.shape[0], float(micro_batches)
    if loss_type == "rloo":
        return jnp.sum(per_token) / (n * k)
    masked = jnp.where(m > 0, jnp.broadcast_to(per_token, m.shape), 0.0)
    if loss_type in ("grpo", "sapo"):
        return jnp.sum(jnp.sum(masked, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)) / (n * k)
    if loss_type == "bnpo":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(m), 1.0) / k
    if loss_type == "dr_grpo":
        return jnp.sum(masked) / (n * (max_completion_length or m.shape[1]) * k)
    if loss_type in ("dapo", "cispo"):
        d = jnp.maximum(jnp.sum(m), 1.0) * k if token_normalizer is None else token_normalizer
        return jnp.sum(masked) / d
    if loss_type == "luspo":
        return jnp.sum(masked) / (n * k)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")


def grpo_loss(
    logprobs: jax.Array,  # [N, T] current policy
    old_logprobs: jax.Array,  # [N, T] sampling policy
    ref_logprobs: jax.Array | None,  # [N, T] reference (None when beta == 0)
    advantages: jax.Array,  # [N] one per completion
    mask: jax.Array,  # [N, T]
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    use_bias_correction_kl: bool = True,
    loss_agg: str = "grpo",
    max_completion_length: int | None = None,
    **terms_kw,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one batch (one micro-batch, one optimizer step; module docstring) with the k3 KL term.

    ``loss_agg``: a TRL loss type (or ``seq_mean`` = grpo, ``token_mean`` = bnpo); ``terms_kw``: the other
    keywords of :func:`grpo_token_terms`; ``use_bias_correction_kl``: the k3 term times rho (TRL's default,
    DeepSeek-V3.2's unbiased KL under off-policy samples). Metrics: ``clipfrac`` (low or high region),
    ``kl``, ``ratio``.
    """
    loss_type = _ALIASES.get(loss_agg, loss_agg)
    per_token, t = grpo_token_terms(
        logprobs, old_logprobs, advantages, mask, loss_type=loss_type, clip_eps=clip_eps,
        clip_eps_high=clip_eps_high, **terms_kw,
    )  # fmt: skip
    m = mask.astype(jnp.float32)
    kl = jnp.zeros_like(m)
    if beta and loss_type != "rloo":
        if ref_logprobs is None:
            raise ValueError("grpo_loss: ref_logprobs is required when beta != 0")
        kl = kl_penalty(logprobs, jax.lax.stop_gradient(ref_logprobs), estimator="k3")
        if use_bias_correction_kl:
            level = terms_kw.get("importance_sampling_level", "token")
            kl = kl * importance_weights(logprobs, old_logprobs, mask, level=level)
        per_token = per_token + beta * kl
    loss = grpo_aggregate(per_token, m, loss_type=loss_type, max_completion_length=max_completion_length)
    w = m if t["ratio"].shape[1] == m.shape[1] else jnp.ones_like(t["ratio"])

    def mean(x):
        return jnp.sum(jnp.broadcast_to(x, w.shape) * w) / jnp.maximum(jnp.sum(w), 1.0)

    metrics = {
        "clipfrac": mean(jnp.maximum(t["low_clipped"], t["high_clipped"])),
        "kl": jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0),
        "ratio": mean(t["ratio"]),
    }
    return loss, jax.lax.stop_gradient(metrics)
