"""Stages of the recipe: each module defines a frozen config dataclass and ``run(config)``.

``sft`` (supervised fine-tuning), ``rm`` (reward model), ``generate_cmd`` (``jaxrlhf generate``); shared
config sections in ``common``, end-of-stage sample generations in ``samples``. The CLI
(:mod:`jaxrlhf.cli`) maps ``jaxrlhf <stage>`` onto them.
"""
