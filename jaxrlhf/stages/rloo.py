"""RLOO: ``jaxrlhf rloo --config FILE.yaml --set key=value ...`` (REINFORCE leave-one-out, no critic).

The GRPO stage (:mod:`jaxrlhf.stages.grpo`: same rollout, rewards, loop, outputs) with TRL's RLOOTrainer
defaults in the ``rloo`` section: each completion's baseline is the mean reward of the other completions of
its prompt (``losses.rloo_advantages``; ``normalize_advantages`` whitens them over the batch), the KL to
the reference is a penalty in the reward (``beta * sum_t (log pi_old - log ref)``, reference held only with
``beta > 0``), and the loss is sequence-level (``loss_type: rloo``: one clipped ratio of summed log-probs per
completion). ``rloo.num_generations`` is ``rollout.sampling.n``.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf import data, rl
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.stages._rl_loop import RLResult, RLTrainConfig, RolloutConfig
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.grpo import RLState, run_group_stage
from jaxrlhf.stages.samples import SampleConfig

__all__ = ["RLOOConfig", "RLOOResult", "RLState", "run"]

RLOOResult = RLResult


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
    data: data.DataConfig  # prompts; batch_size = prompts per iteration
    name: str = "rloo"
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    lora: lora_lib.LoraConfig | None = None
    reward: rl.RewardConfig = rl.RewardConfig()
    rollout: RolloutConfig = RolloutConfig(SamplingConfig(max_new_tokens=64, temperature=1.0, n=2))
    rloo: rl.RLOOHyperParams = rl.RLOOHyperParams()
    optim: train_lib.OptimConfig = train_lib.OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0)
    train: RLTrainConfig = RLTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)
    export: ExportConfig = ExportConfig()
    samples: SampleConfig = SampleConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=1.0))


def run(config: RLOOConfig) -> RLResult:
    """Run RLOO (see the module docstring); resumes from ``checkpoints/`` if present."""
    return run_group_stage(config, "rloo", config.rloo)
