"""compile_cache: directory precedence, the off switch, and a cache entry written for a compiled program."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from jaxrlhf import compile_cache


@pytest.fixture(autouse=True)
def _restore_config():
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    from jax._src import compilation_cache as cc

    cc.reset_cache()  # a test that pointed the cache elsewhere: the session's cache (tests/conftest.py) again


def test_default_dir_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    got = compile_cache.enable_compilation_cache()
    assert got == str(tmp_path / "jaxrlhf" / "jax_cache") and os.path.isdir(got)
    assert jax.config.jax_compilation_cache_dir == got


def test_env_overrides_and_argument_overrides_env(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "from_env"))
    assert compile_cache.enable_compilation_cache() == str(tmp_path / "from_env")
    assert compile_cache.enable_compilation_cache(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "arg")


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false"])
def test_off_switch_leaves_config_alone(monkeypatch, value):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == before


def test_unwritable_dir_warns_and_stays_off(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable_compilation_cache(str(blocker / "sub")) is None
    assert "cannot create" in caplog.text and jax.config.jax_compilation_cache_dir == before


def test_compiled_program_is_written_to_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    cache_dir = compile_cache.enable_compilation_cache(str(tmp_path / "c"), min_compile_secs=0.0)
    try:
        from jax._src import compilation_cache as cc

        cc.reset_cache()  # the cache object is created once per process: point it at the new directory
    except (ImportError, AttributeError):
        pass
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.234567)(jnp.arange(7.0)).block_until_ready()
    assert os.listdir(cache_dir), "no cache entry was written"


@pytest.mark.parametrize(("value", "want"), [(None, 1.0), ("0", 0.0), ("2.5", 2.5), ("soon", 1.0)])
def test_min_compile_secs_from_env(monkeypatch, tmp_path, value, want):
    if value is None:
        monkeypatch.delenv(compile_cache.MIN_SECS_ENV, raising=False)
    else:
        monkeypatch.setenv(compile_cache.MIN_SECS_ENV, value)
    assert compile_cache.enable_compilation_cache(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == want
    compile_cache.enable_compilation_cache(str(tmp_path / "c"), min_compile_secs=3.0)  # the argument wins
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0
