"""Static configuration of the PPO update: which models (``PPOModels``) and the hyper-parameters
(``PPOHyperParams``). Both are frozen, hashable dataclasses; neither is passed into jitted code — the update
closes over their fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrlhf.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS
from jaxrlhf.models.spec import ModelSpec

KL_MODES = ("reward", "loss")


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """The trainable actors. ``policy_lora`` / ``critic_lora`` None: the whole backbone is trained (state
    holds full params); a LoraConfig: the state holds adapters and the frozen base is ``PPOFrozen``'s.

    The critic is a backbone (``critic_spec``: e.g. the reward model's, InstructGPT; or the policy's base
    with its own adapters) plus a value head on its final hidden states at the completion positions.
    """

    policy_spec: ModelSpec
    critic_spec: ModelSpec
    policy_lora: Any = None  # jaxrlhf.lora.LoraConfig | None
    critic_lora: Any = None


@dataclasses.dataclass(frozen=True)
class PPOHyperParams:
    """PPO hyper-parameters (see :mod:`jaxrlhf.rl.ppo` for the math each one enters).

    Data: every update runs ``epochs`` passes over the rollout's R rows, each split (after a fresh shuffle)
    into ``num_minibatches`` minibatches of R / num_minibatches rows, each of them ``grad_accum``
    micro-batches; one optimizer step per minibatch (policy and critic each). KL: ``kl_mode="reward"`` puts
    ``-kl_coef * kl_estimator(pi_old, ref)`` into the per-token rewards (InstructGPT), ``"loss"`` adds
    ``kl_coef * kl_loss_estimator(pi, ref)`` to the policy loss per token (GRPO-style); the coefficient is
    adaptive (Ziegler et al.) when ``kl_target`` is set, else fixed at ``init_kl_coef``.
    """

    epochs: int = 4
    num_minibatches: int = 1
    grad_accum: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    advantage_keep_mean: bool = False
    kl_mode: str = "reward"
    kl_estimator: str = "k1"
    kl_loss_estimator: str = "k3"
    init_kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10_000.0
    score_clip: float | None = None
    update_reward_norm: bool = True
    ptx_coef: float = 0.0
    ema_decay: float | None = None
    critic_warmup_iterations: int = 0
    temperature: float = 1.0
    loss_agg: str = "token_mean"
    compute_dtype: str | None = None
    attention_impl: str = "plain"
    remat: str = "none"  # the update's forwards: none / full / save_dots (the stages set model.remat)

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"PPOHyperParams: {what}")

        need(self.epochs >= 1 and self.num_minibatches >= 1 and self.grad_accum >= 1,
             f"epochs ({self.epochs}), num_minibatches ({self.num_minibatches}) and grad_accum "
             f"({self.grad_accum}) must be >= 1")  # fmt: skip
        need(self.dual_clip is None or self.dual_clip > 1.0, f"dual_clip must be > 1, got {self.dual_clip}")
        need(self.remat in ("none", "full", "save_dots"), f"remat: none|full|save_dots, not {self.remat!r}")
        need(self.kl_mode in KL_MODES, f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        need(self.kl_estimator in KL_ESTIMATORS, f"kl_estimator {self.kl_estimator!r} not in {KL_ESTIMATORS}")
        need(self.kl_loss_estimator in KL_ESTIMATORS, f"kl_loss_estimator {self.kl_loss_estimator!r} unknown")
        need(self.loss_agg in LOSS_AGGREGATIONS, f"loss_agg must be one of {LOSS_AGGREGATIONS}")
        need(
            self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, f"ema_decay {self.ema_decay} not in [0, 1)"
        )
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(self.critic_warmup_iterations >= 0, "critic_warmup_iterations must be >= 0")
        need(self.kl_target is None or self.kl_target > 0, f"kl_target must be > 0, got {self.kl_target}")
        need(self.ptx_coef >= 0, f"ptx_coef must be >= 0, got {self.ptx_coef}")

    @property
    def rows_divisor(self) -> int:
        """The rollout's row count must be a multiple of this."""
        return self.num_minibatches * self.grad_accum

    def replace(self, **kw: Any) -> PPOHyperParams:
        return dataclasses.replace(self, **kw)
