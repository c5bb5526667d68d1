"""JAX's persistent compilation cache, on by default for every stage run.

``enable_compilation_cache()`` points ``jax_compilation_cache_dir`` at, in order of precedence: the ``path``
argument, the environment variable ``JAXRLHF_COMPILATION_CACHE``, or ``$XDG_CACHE_HOME/jaxrlhf/jax_cache``
(``~/.cache/jaxrlhf/jax_cache``). ``JAXRLHF_COMPILATION_CACHE=off`` (or ``0`` / ``false`` / ``none``) turns
it off. A rerun or resume of the same config then loads its compiled steps instead of recompiling them
(XLA executables are keyed by the program, the devices and the jax/XLA versions, so a changed config or
upgrade simply misses). Programs that compile in under ``min_compile_secs`` are not written (default 1 s,
or ``JAXRLHF_COMPILATION_CACHE_MIN_SECS``: ``0`` writes every program, which pays off for tiny models whose
many small programs each compile in well under a second, e.g. a test suite restarting runs).
"""

from __future__ import annotations

import logging
import os

import jax

ENV = "JAXRLHF_COMPILATION_CACHE"
MIN_SECS_ENV = "JAXRLHF_COMPILATION_CACHE_MIN_SECS"
_OFF = ("off", "0", "false", "none", "no")
logger = logging.getLogger("jaxrlhf.compile_cache")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jaxrlhf/jax_cache`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxrlhf", "jax_cache")


def enable_compilation_cache(path: str | None = None, *, min_compile_secs: float | None = None) -> str | None:
    """Turn the persistent cache on (see the module docstring); returns the directory, or None when off.
    ``min_compile_secs`` None: ``$JAXRLHF_COMPILATION_CACHE_MIN_SECS``, else 1.0.

    Safe to call more than once (the last call wins). An unwritable directory logs a warning and leaves the
    cache off rather than failing the run.
    """
    choice = path if path is not None else os.environ.get(ENV)
    if choice is not None and choice.strip().lower() in _OFF:
        logger.info("compilation cache off (%s=%s)", ENV, choice)
        return None
    cache_dir = os.path.abspath(os.path.expanduser(choice or default_cache_dir()))
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        logger.warning("compilation cache off: cannot create %s (%s)", cache_dir, e)
        return None
    if min_compile_secs is None:
        raw = os.environ.get(MIN_SECS_ENV, "1.0")
        try:
            min_compile_secs = float(raw)
        except ValueError:
            logger.warning("%s=%r is not a number of seconds: using 1.0", MIN_SECS_ENV, raw)
            min_compile_secs = 1.0
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("compilation cache: %s", cache_dir)
    return cache_dir
