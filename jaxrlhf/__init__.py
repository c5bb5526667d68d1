"""jaxrlhf: the whole RLHF recipe (SFT, reward model, PPO, DPO, GRPO) with LoRA in JAX/Flax."""

__version__ = "0.1.0"
