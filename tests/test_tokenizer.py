"""model/tokenizer.py against transformers.AutoTokenizer, on real tokenizers (shipped in tests/assets/)."""

import functools
import json
import shutil
from pathlib import Path

import jinja2
import pytest

transformers = pytest.importorskip("transformers")

from model.tokenizer import CHATML_TEMPLATE, Tokenizer  # noqa: E402
from tests.conftest import shared  # noqa: E402

QWEN3 = shared("tokenizer_qwen3")
GPT2 = shared("tokenizer_gpt2")
STORIES = shared("stories260k/hf")
ALL = {"qwen3": QWEN3, "gpt2": GPT2, "stories260k": STORIES}

TEXTS = [
    "Hello world, 1234!",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nend",
    "héllo wörld — “quotes” ünïcödé",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🎉 ok",
    "3.14159 1,000,000 0x1F 2024-06-01 12345678901234567890",
    "",
    " ",
    "\n",
    "def f(x):\n    return x ** 2  # comment",
]

# Llama-2-style template: no generation prompt and no generation tags.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Like Mistral's templates: the system prompt goes into the final user message, so the rendering of earlier
# text depends on how long the conversation is.
SYSTEM_LAST_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system is defined %}{{- '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# ChatML with transformers' generation tags, so transformers computes its own assistant mask to compare with.
CHATML_TAGGED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Hi! Who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "Thanks. Say bye in French, über-politely."},
    {"role": "assistant", "content": "Au revoir, très cher ami !"},
]
# The final assistant message carries reasoning, which Qwen3 keeps; an earlier one too, which Qwen3 drops.
THINKING = [
    {"role": "user", "content": "Is 17 prime?"},
    {"role": "assistant", "content": "<think>\nCheck divisors up to 4.\n</think>\n\nYes, 17 is prime."},
    {"role": "user", "content": "And 21?"},
    {"role": "assistant", "content": "<think>21 = 3 * 7.</think>No: 21 = 3 × 7."},
]

CHAT_CASES = {
    "multi_turn": (CONVERSATION, {}),
    "generation_prompt": (CONVERSATION[:-1], {"add_generation_prompt": True}),
    "no_thinking": (CONVERSATION, {"enable_thinking": False}),
    "no_thinking_generation_prompt": (CONVERSATION[:-1], {"add_generation_prompt": True, "enable_thinking": False}),
    "thinking": (THINKING, {}),
}


@functools.cache
def ours(path: Path, default_chat_template=None) -> Tokenizer:
    return Tokenizer.from_dir(path, default_chat_template=default_chat_template)


@functools.cache
def reference(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def reference_chat_ids(ref, messages, **kw) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, **kw)
    # transformers 5 returns a BatchEncoding by default, 4.x a plain list.
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def masked_runs(tok: Tokenizer, ids, mask) -> list[str]:
    """Decode each contiguous run of masked tokens, specials kept."""
    runs, run = [], []
    for token, keep in zip(ids, mask):
        if keep:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


# ---- plain text ----

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_transformers(name, add_special_tokens):
    tok, ref = ours(ALL[name]), reference(ALL[name])
    expected = [ref.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS]
    assert [tok.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS] == expected
    assert tok.encode_batch(TEXTS, add_special_tokens=add_special_tokens) == expected


def test_llama_adds_bos_only_with_special_tokens():
    tok = ours(STORIES)
    assert tok.encode("Once upon a time", add_special_tokens=True)[0] == tok.bos_id == 1
    assert tok.encode("Once upon a time")[0] != 1


@pytest.mark.parametrize("name", ALL)
def test_decode_round_trip(name):
    tok, ref = ours(ALL[name]), reference(ALL[name])
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ALL)
def test_special_ids_match_transformers(name):
    tok, ref = ours(ALL[name]), reference(ALL[name])
    assert tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    assert tok.eos_id in tok.stop_ids


# ---- chat rendering ----

@pytest.mark.parametrize("case", CHAT_CASES)
def test_qwen3_chat_rendering_matches_transformers(case):
    messages, kw = CHAT_CASES[case]
    expected = reference(QWEN3).apply_chat_template(messages, tokenize=False, **kw)
    assert ours(QWEN3).apply_chat_template(messages, **kw) == expected


@pytest.mark.parametrize("case", CHAT_CASES)
def test_qwen3_chat_ids_match_transformers(case):
    messages, kw = CHAT_CASES[case]
    ids, mask = ours(QWEN3).encode_chat(messages, **kw)
    assert ids == reference_chat_ids(reference(QWEN3), messages, **kw)
    assert len(mask) == len(ids)


# What the mask must cover, decoded run by run: each assistant message as the full conversation renders it,
# with <|im_end|> and without the "<|im_start|>assistant\n" header or the "\n" after <|im_end|>. Qwen3 adds an
# empty think block to the final turn when thinking is on; the model generates it, so it is masked. With
# enable_thinking=False the generation prompt itself holds that block, so it is not.
EXPECTED_RUNS = {
    "multi_turn": [
        "I am a helpful assistant.<|im_end|>",
        "2 + 2 = 4.<|im_end|>",
        "<think>\n\n</think>\n\nAu revoir, très cher ami !<|im_end|>",
    ],
    "generation_prompt": ["I am a helpful assistant.<|im_end|>", "2 + 2 = 4.<|im_end|>"],
    "no_thinking": [
        "I am a helpful assistant.<|im_end|>",
        "2 + 2 = 4.<|im_end|>",
        "Au revoir, très cher ami !<|im_end|>",
    ],
    "no_thinking_generation_prompt": ["I am a helpful assistant.<|im_end|>", "2 + 2 = 4.<|im_end|>"],
    # Qwen3 drops the reasoning of turns before the last user message.
    "thinking": [
        "Yes, 17 is prime.<|im_end|>",
        "<think>\n21 = 3 * 7.\n</think>\n\nNo: 21 = 3 × 7.<|im_end|>",
    ],
}


@pytest.mark.parametrize("case", CHAT_CASES)
def test_qwen3_assistant_mask(case):
    messages, kw = CHAT_CASES[case]
    tok = ours(QWEN3)
    ids, mask = tok.encode_chat(messages, **kw)
    assert masked_runs(tok, ids, mask) == EXPECTED_RUNS[case]
    # Nothing the user or system wrote, and no role header, is ever masked in.
    masked_text = "".join(masked_runs(tok, ids, mask))
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] not in masked_text
    assert "<|im_start|>" not in masked_text and "assistant\n" not in masked_text


def test_mask_matches_transformers_generation_tags(tmp_path):
    # A template with {% generation %} tags lets transformers compute the mask itself; ours ignores the tags.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(QWEN3 / name)
    (tmp_path / "chat_template.jinja").write_text(CHATML_TAGGED)  # overrides the config's template
    tok, ref = Tokenizer.from_dir(tmp_path), reference(tmp_path)
    for messages in (CONVERSATION, THINKING, CONVERSATION[:-1]):
        out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = tok.encode_chat(messages)
        assert ids == list(out["input_ids"])
        assert [int(m) for m in mask] == list(out["assistant_masks"])


def test_llama2_template_without_generation_prompt():
    tok = ours(STORIES, LLAMA2_TEMPLATE)
    messages = [m for m in CONVERSATION if m["role"] != "system"]
    text = tok.apply_chat_template(messages)
    assert text == reference(STORIES).apply_chat_template(messages, chat_template=LLAMA2_TEMPLATE, tokenize=False)
    ids, mask = tok.encode_chat(messages)
    assert ids == reference_chat_ids(reference(STORIES), messages, chat_template=LLAMA2_TEMPLATE)
    assert tok.decode(ids[:1], skip_special_tokens=False) == "<s>"
    # The leading space is part of each content's first token ("▁I"), and the Llama decoder strips it.
    expected = [m["content"] + " </s>" for m in messages if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == expected


def test_template_that_rewrites_earlier_turns():
    tok = ours(STORIES, SYSTEM_LAST_TEMPLATE)
    ids, mask = tok.encode_chat(CONVERSATION)
    assert ids == reference_chat_ids(reference(STORIES), CONVERSATION, chat_template=SYSTEM_LAST_TEMPLATE)
    expected = [m["content"] + "</s>" for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == expected


def test_builtin_chatml_default():
    tok = ours(GPT2, "chatml")  # GPT-2 has no chat template, and <|im_end|> is plain text to it
    assert tok.chat_template == CHATML_TEMPLATE
    for kw in ({}, {"add_generation_prompt": True}):
        expected = reference(GPT2).apply_chat_template(
            CONVERSATION, chat_template=CHATML_TEMPLATE, tokenize=False, **kw
        )
        assert tok.apply_chat_template(CONVERSATION, **kw) == expected
    ids, mask = tok.encode_chat(CONVERSATION)
    assert ids == reference_chat_ids(reference(GPT2), CONVERSATION, chat_template=CHATML_TEMPLATE)
    expected = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == expected


def test_template_extras_match_transformers():
    # tojson (non-ASCII kept, indent), raise_exception, strftime_now, loopcontrols, and template kwargs.
    template = (
        "{{ tools | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
        "{{ custom_flag }}|{{ bos_token }}{{ eos_token }}"
    )
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "<Zürich>"}}}]
    kw = {"tools": tools, "custom_flag": True}
    tok = ours(GPT2, template)
    expected = reference(GPT2).apply_chat_template(CONVERSATION, chat_template=template, tokenize=False, **kw)
    assert tok.apply_chat_template(CONVERSATION, **kw) == expected
    failing = ours(GPT2, "{{ raise_exception('no system role here') }}")
    with pytest.raises(jinja2.TemplateError, match="no system role here"):
        failing.apply_chat_template(CONVERSATION)


# ---- loading, saving and errors ----

def test_configs_in_older_forms(tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(QWEN3 / "tokenizer.json")
    config = {
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "pad_token": None,
        "chat_template": [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": "default!"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    generation_config = {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_id == tok.pad_id == 151643
    assert tok.bos_id == 151643
    assert tok.stop_ids == {151643, 151645}
    assert tok.chat_template == "default!"


def test_save_reloads_identically(tmp_path):
    for path, default in ((QWEN3, None), (STORIES, None), (GPT2, "chatml")):
        out = tmp_path / path.name
        ours(path, default).save(out)
        reloaded, ref = Tokenizer.from_dir(out), reference(out)
        assert reloaded.chat_template == ours(path, default).chat_template
        assert [reloaded.encode(t, add_special_tokens=True) for t in TEXTS] == [ref.encode(t) for t in TEXTS]
        if reloaded.chat_template is not None:  # the default template travels with the checkpoint
            assert reloaded.apply_chat_template(CONVERSATION) == ref.apply_chat_template(CONVERSATION, tokenize=False)


def test_missing_chat_template_names_dir():
    with pytest.raises(ValueError, match=str(GPT2)) as err:
        ours(GPT2).apply_chat_template(CONVERSATION)
    assert "default_chat_template" in str(err.value)


def test_missing_tokenizer_json_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_config_names_file_and_line(tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(GPT2 / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{\n  "eos_token": "<|endoftext|>",\n  oops\n}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON at line 3"):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_json_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: invalid JSON at line 1"):
        Tokenizer.from_dir(tmp_path)
    shutil.copyfile(GPT2 / "tokenizer_config.json", tmp_path / "tokenizer.json")  # JSON, but not a tokenizer
    with pytest.raises(ValueError, match=r"tokenizer\.json: could not load"):
        Tokenizer.from_dir(tmp_path)
