"""A module-scoped persistent compilation cache for stage tests that run the same stage config several times
in one process (a run, a shortened run and its resume): the later runs load the first one's executables
instead of compiling them again, as a user's rerun does (``jaxrlhf.compile_cache``).

Only when the session-wide cache of ``tests/conftest.py`` is off (``JAXRLHF_TEST_COMPILATION_CACHE=off``;
otherwise that cache does this, across modules and processes too). The cache lives in a fresh directory of
this test session (hermetic: nothing from earlier sessions) and is switched off again after the module, so
the rest of the worker runs as ``tests/conftest.py`` set it up (``JAXRLHF_COMPILATION_CACHE=off``). JAX
decides once per process whether the cache is used; it is told to decide again on the way in and out.
"""

from __future__ import annotations

import os

import jax
import pytest

from jaxrlhf import compile_cache

SESSION_CACHE_ENV = "JAXRLHF_TEST_SESSION_CACHE"  # tests/conftest.py's session-wide cache

_KEYS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def _redecide() -> None:
    from jax._src import compilation_cache as cc

    cc.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def module_compile_cache(tmp_path_factory):
    if os.environ.get(SESSION_CACHE_ENV):  # tests/conftest.py's session-wide cache already does this
        yield
        return
    old = {k: getattr(jax.config, k) for k in _KEYS}
    mp = pytest.MonkeyPatch()
    path = str(tmp_path_factory.mktemp("jax_cache"))
    mp.setenv(compile_cache.ENV, path)  # what runner.start enables again at every run
    mp.setenv(compile_cache.MIN_SECS_ENV, "0")  # the tiny models' programs compile in well under 1 s
    compile_cache.enable_compilation_cache(path)
    _redecide()
    yield
    mp.undo()
    for k, v in old.items():
        jax.config.update(k, v)
    _redecide()
