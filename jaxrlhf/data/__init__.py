"""The data layer: tokenizers, chat templates with assistant-only loss masks, formats, packing, loading and a
deterministic resumable per-host loader. Batch layouts are documented in :mod:`jaxrlhf.data.formats`.

    tok = data.load_tokenizer(path, pad_policy="eos", chat_template=None)
    ds = data.build_dataset(data.DataConfig(path="train.jsonl", max_length=512), tok, kind="sft")
    loader = data.Loader(ds, batch_size=8, seed=0)
    batch = next(loader)                       # numpy dict; loader.state() goes into the checkpoint
    batch = data.to_global(batch, mesh)        # jax.Arrays sharded over (data, fsdp)
"""

from jaxrlhf.data.dataset import DataConfig, TokenizedDataset, build_dataset
from jaxrlhf.data.errors import DataError, TemplateError
from jaxrlhf.data.formats import FORMATS, KINDS, detect_format, process_row
from jaxrlhf.data.loader import Loader, collate, to_global
from jaxrlhf.data.packing import length_buckets, pack_examples
from jaxrlhf.data.sources import load_sources
from jaxrlhf.data.templates import TEMPLATES, resolve_template, tokenize_chat, tokenize_chat_prompt
from jaxrlhf.data.tokenizer import PAD_POLICIES, Tokenizer, load_tokenizer

__all__ = [
    "FORMATS",
    "KINDS",
    "PAD_POLICIES",
    "TEMPLATES",
    "DataConfig",
    "DataError",
    "Loader",
    "TemplateError",
    "TokenizedDataset",
    "Tokenizer",
    "build_dataset",
    "collate",
    "detect_format",
    "length_buckets",
    "load_sources",
    "load_tokenizer",
    "pack_examples",
    "process_row",
    "resolve_template",
    "to_global",
    "tokenize_chat",
    "tokenize_chat_prompt",
]
