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


def pytest_configure(config):
    # pytest-xdist's --dist loadfile hands files out largest first by *number of tests* (loadscopereorder),
    # which puts the few-test, long-running files (the CLI kill / reshard runs, the stage tests) last, where
    # one worker runs them alone while the other idles. Files go out in collection order instead, and
    # pytest_collection_modifyitems orders them: slow files first, then the rest by test count.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    slow = {f for f, its in files.items() if any(it.get_closest_marker("slow") for it in its)}
    order = sorted(files, key=lambda f: (f not in slow, 0 if f in slow else -len(files[f])))  # stable
    items[:] = [it for f in order for it in files[f]]
