"""Test-wide setup: 8 fake CPU devices (set before jax is imported anywhere), f32 matmuls, offline hub."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAXRLHF_COMPILATION_CACHE", "off")  # hermetic tests: no persistent compile cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")
