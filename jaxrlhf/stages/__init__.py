"""Stages of the recipe: each module defines a frozen config dataclass and ``run(config)``.

``sft`` (supervised fine-tuning), ``rm`` (reward model), ``generate_cmd`` (``jaxrlhf generate``); the CLI
(:mod:`jaxrlhf.cli`) maps ``jaxrlhf <stage>`` onto them.
"""
