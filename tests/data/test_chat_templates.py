"""Assistant-only loss masks from unmarked templates equal the masks transformers computes from the same
templates written with ``{% generation %}`` markers (``return_assistant_tokens_mask=True``)."""

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from transformers import AutoTokenizer

from jaxrlhf import data
from jaxrlhf.data.templates import render

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
        {"role": "user", "content": "Et en français ? 🙂"},
        {"role": "assistant", "content": "Deux plus deux font quatre. 日本語"},
    ],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Explain packing."},
        {"role": "assistant", "content": "  Several examples share one row.\n"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "ok"},
    ],
]

# The fallback templates again, written by hand with generation markers around what the model must produce.
MARKED = {
    "llama-2": data.TEMPLATES["llama-2"].replace(
        "{{ ' ' + content.strip() + ' ' + eos_token }}",
        "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}",
    ),
    "llama-3": (
        "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
        "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": data.TEMPLATES["alpaca"].replace(
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}",
        "{{ '### Response:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{{ '\\n\\n' }}",
    ),
    "plain": data.TEMPLATES["plain"].replace(
        "{{ 'Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}",
        "{{ 'Assistant:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{{ '\\n\\n' }}",
    ),
}
# a tokenizer-supplied template (zephyr style) without markers, and the same with markers
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ZEPHYR_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
)
# a template whose generation prompt ends in a space: BPE merges " the" across the boundary
SPACED = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'A: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)
SPACED_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'A: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_toks(tok_dirs):
    return {n: AutoTokenizer.from_pretrained(tok_dirs[n], local_files_only=True) for n in ("sp_llama", "bpe")}


@pytest.fixture(scope="module")
def our_toks(tok_dirs):
    return {n: data.load_tokenizer(tok_dirs[n]) for n in ("sp_llama", "bpe")}


def _hf_mask(hf, template, messages):
    out = hf.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def _check_against_hf(tok, hf, template, marked, messages):
    assert render(marked, messages, False, tok.bos_token, tok.eos_token) == render(
        template, messages, False, tok.bos_token, tok.eos_token
    ), "reference template must render the same text"
    tok.chat_template = template
    ids, mask = data.tokenize_chat(tok, messages)
    ref_ids, ref_mask = _hf_mask(hf, marked, messages)
    prefix = list(tok.prefix_ids)
    if ref_ids[: len(prefix)] != prefix:  # the data layer adds the family's BOS when the template has none
        ref_ids, ref_mask = prefix + ref_ids, [0] * len(prefix) + ref_mask
    assert ids == ref_ids
    assert mask == ref_mask
    assert sum(mask) > 0


@pytest.mark.parametrize("name", sorted(MARKED))
@pytest.mark.parametrize("tok_name", ["sp_llama", "bpe"])
def test_fallback_template_masks_equal_generation_marker_masks(tok_dirs, hf_toks, name, tok_name):
    tok = data.load_tokenizer(tok_dirs[tok_name])
    for messages in CONVERSATIONS:
        _check_against_hf(tok, hf_toks[tok_name], data.TEMPLATES[name], MARKED[name], messages)


@pytest.mark.parametrize("tok_name", ["sp_llama", "bpe"])
def test_tokenizer_supplied_template_without_markers(tmp_path, hf_toks, tok_name, tok_dirs):
    import _tokenizers

    if tok_name == "bpe":
        path = _tokenizers.build_bpe_tokenizer_json(tmp_path, chat_template=ZEPHYR, name="zephyr")
    else:
        import json
        import shutil

        path = str(tmp_path / "sp_zephyr")
        shutil.copytree(tok_dirs["sp_llama"], path)
        cfg = json.load(open(f"{path}/tokenizer_config.json"))
        json.dump({**cfg, "chat_template": ZEPHYR}, open(f"{path}/tokenizer_config.json", "w"))
    tok = data.load_tokenizer(path)
    assert tok.chat_template == ZEPHYR  # the tokenizer's own template is used
    for messages in CONVERSATIONS:
        _check_against_hf(tok, hf_toks[tok_name], ZEPHYR, ZEPHYR_MARKED, messages)


def test_tokens_merged_across_the_boundary(tok_dirs, hf_toks):
    tok = data.load_tokenizer(tok_dirs["bpe"])
    messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "the answer"}]
    tok.chat_template = SPACED
    prompt_ids = tok.encode(tok.render_chat(messages[:1], add_generation_prompt=True))
    full_ids = tok.encode(tok.render_chat(messages))
    assert full_ids[: len(prompt_ids)] != prompt_ids  # " the" really merges across the boundary
    _check_against_hf(tok, hf_toks["bpe"], SPACED, SPACED_MARKED, messages)


@pytest.mark.parametrize("name", sorted(MARKED))
def test_tiktoken_masks_decode_to_the_assistant_turns(tok_dirs, name):
    tok = data.load_tokenizer(tok_dirs["tiktoken"], chat_template=name)
    stop = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(name, tok.eos_token)
    for messages in CONVERSATIONS:
        ids, mask = data.tokenize_chat(tok, messages)
        runs, cur = [], []
        for i, m in zip(ids, mask, strict=True):
            if m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        got = [tok.decode(r) for r in runs]
        contents = [m["content"] for m in messages if m["role"] == "assistant"]
        if name == "llama-2":
            want = [" " + c.strip() + " " + stop for c in contents]
        elif name == "llama-3":
            want = [c.strip() + stop for c in contents]
        else:
            want = [c + stop for c in contents]
        assert got == want
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if not m]).count(stop) == sum(
            m["role"] != "assistant" for m in messages
        ) * (name in ("llama-3", "chatml"))


def test_last_turn_only_and_prompt_ids(tok_dirs):
    tok = data.load_tokenizer(tok_dirs["bpe"], chat_template="chatml")
    messages = CONVERSATIONS[0]
    ids, mask = data.tokenize_chat(tok, messages, last_turn_only=True)
    first, n = mask.index(1), sum(mask)
    assert all(
        mask[first : first + n]
    )  # one run: the final answer and its stop token (not the "\n" after it)
    assert tok.decode(ids[first : first + n]) == messages[-1]["content"] + "<|im_end|>"
    assert tok.decode(ids[first + n :]) == "\n"
    prompt = data.tokenize_chat_prompt(tok, messages)
    assert ids[:first] == prompt  # prompt for generation = everything before the last answer


def test_bad_conversations(tok_dirs):
    tok = data.load_tokenizer(tok_dirs["bpe"], chat_template="chatml")
    with pytest.raises(data.TemplateError, match="no assistant message"):
        data.tokenize_chat(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(data.TemplateError, match="string 'role' and 'content'"):
        data.tokenize_chat(tok, [{"role": "user", "content": 3}])
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old] {% endif %}"
        "{{ m['content'] + eos_token }}{% endfor %}"
    )
    with pytest.raises(data.TemplateError, match="not prefix-stable"):
        data.tokenize_chat(tok, CONVERSATIONS[1])


_PIECES = ["a", "b", " ", "é", "🙂", "\n", ".", "!", "the", " the", "  ", "\n\n"]
_content = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8).map("".join)


@given(
    system=st.one_of(st.none(), _content),
    turns=st.lists(st.tuples(_content, _content), min_size=1, max_size=3),
    name=st.sampled_from(sorted(MARKED)),
    tok_name=st.sampled_from(["bpe", "sp_llama"]),
)
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_conversations_match_generation_marker_masks(our_toks, hf_toks, system, turns, name, tok_name):
    """Any contents (leading / trailing spaces and newlines, unicode) give transformers' marker masks."""
    tok = our_toks[tok_name]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        if not assistant.strip():
            assistant = "x" + assistant
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    _check_against_hf(tok, hf_toks[tok_name], data.TEMPLATES[name], MARKED[name], messages)
