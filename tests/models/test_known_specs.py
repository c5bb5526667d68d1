"""``models.known_specs``: the seed models' public config.json values give the models' published sizes."""

from __future__ import annotations

import math

import jax
import pytest

from jaxrlhf.models.known_specs import HF_CONFIGS, known_hf_config, known_spec
from jaxrlhf.models.spec import ModelSpec
from tests import _recipe_memory as mem

# parameter counts as the model cards / transformers' num_parameters() report them (tied embeddings once);
# the safetensors of each repository hold exactly these tensors (Flan-T5's lm_head is a separate matrix)
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-7b-chat-hf": 6_738_415_616,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "bigscience/bloomz-7b1": 7_069_016_064,
    "facebook/opt-iml-1.3b": 1_315_758_080,
    "google/flan-t5-base": 247_577_856,
    "google/flan-t5-xl": 2_849_757_184,
    "google/flan-ul2": 19_459_613_696,
}


@pytest.mark.parametrize("hub_id", sorted(HF_CONFIGS))
def test_known_spec_has_the_published_size(hub_id):
    # the abstract parameter tree (jax.eval_shape over models.init_params), shared with tests/test_recipes.py
    shapes, _ = mem._trees(mem.architecture(hub_id), None)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == PUBLISHED[hub_id]


@pytest.mark.parametrize("hub_id", sorted(HF_CONFIGS))
def test_known_spec_round_trips_through_its_hf_config(hub_id):
    spec = known_spec(hub_id)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    assert spec.eos_token_ids, hub_id  # generation stops on the model's own EOS


def test_known_specs_differ_where_the_models_do():
    assert known_spec("meta-llama/Meta-Llama-3-8B-Instruct").eos_token_ids == (128009,)  # <|eot_id|>
    assert known_spec("meta-llama/Meta-Llama-3-8B").eos_token_ids == (128001,)
    assert known_spec("mistralai/Mistral-7B-v0.1").sliding_window == 4096
    assert known_spec("google/flan-ul2").tie_word_embeddings  # no tie_word_embeddings key: T5's default
    assert not known_spec("google/flan-t5-xl").tie_word_embeddings


def test_known_hf_config_is_a_copy_and_unknown_ids_are_named():
    cfg = known_hf_config("google/flan-t5-xl")
    cfg["d_model"] = 1
    assert known_hf_config("google/flan-t5-xl")["d_model"] == 2048
    with pytest.raises(KeyError, match="known hub ids: .*google/flan-ul2"):
        known_spec("google/flan-t5-xxl")
