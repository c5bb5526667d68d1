"""Bundled data (``jaxrlhf/assets/tiny``: the tiny task of the embedded default)."""
