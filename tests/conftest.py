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

# One persistent compilation cache for the whole test session: a fresh directory made by the process that
# starts the session (the pytest-xdist controller, or plain pytest), handed to the workers and to every CLI
# subprocess the tests start by the environment (JAXRLHF_COMPILATION_CACHE, which runner.start and the CLI
# read), every program written (the tiny models' programs compile in well under the default 1 s), deleted
# at the end of the session. Hermetic: nothing survives from an earlier session, and an executable loaded
# from the cache is the one XLA compiled for the same program, devices and flags. Stage runs repeated in
# other processes or other test files (the session stages, kill / resume restarts, multi-host runs, the
# pipeline's stages) load their compiled steps instead of compiling them again.
# JAXRLHF_TEST_COMPILATION_CACHE=off runs without it (the cache of each test that makes its own stays).
SESSION_CACHE_ENV = "JAXRLHF_TEST_SESSION_CACHE"  # set by the process that made (and deletes) the dir
_OWN_SESSION_CACHE = None
if os.environ.get("JAXRLHF_TEST_COMPILATION_CACHE", "").strip().lower() in ("off", "0", "false", "no"):
    os.environ.pop(SESSION_CACHE_ENV, None)
    os.environ["JAXRLHF_COMPILATION_CACHE"] = "off"  # hermetic tests: no persistent compile cache
else:
    if not os.environ.get(SESSION_CACHE_ENV):  # the controller: workers and subprocesses inherit it
        import tempfile

        _OWN_SESSION_CACHE = tempfile.mkdtemp(prefix="jaxrlhf-test-jax-cache-")
        os.environ[SESSION_CACHE_ENV] = _OWN_SESSION_CACHE
    os.environ["JAXRLHF_COMPILATION_CACHE"] = os.environ[SESSION_CACHE_ENV]
    os.environ["JAXRLHF_COMPILATION_CACHE_MIN_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxrlhf import compile_cache  # noqa: E402

compile_cache.enable_compilation_cache()  # this process too (off: leaves jax's defaults)

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


def pytest_unconfigure(config):
    if _OWN_SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_SESSION_CACHE, ignore_errors=True)
