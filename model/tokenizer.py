"""The tokenizer: a HF `tokenizer.json` run by the `tokenizers` library, plus the model's Jinja chat template.

Ids match `transformers.AutoTokenizer` (tests/test_tokenizer.py checks it), without importing transformers.
`encode_chat` also returns the assistant mask that SFT trains on, for any template, with or without
`{% generation %}` tags (see `_assistant_spans` for how).
"""

import json
import shutil
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from model.files import read_json

# ChatML, as used by Qwen and SmolLM. Only used when asked for (`default_chat_template="chatml"`), since a
# template the model was not trained with silently degrades it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The special-token names transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Everything transformers, vLLM or SentencePiece users may look for beside a model.
_FILES_TO_SAVE = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def _token_content(value) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` markers and renders their body unchanged;
    we find the assistant spans without them, so templates that carry them still parse."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (< > &), which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    # The same environment as transformers' `_compile_jinja_template`: templates come from the Hub, so they
    # run sandboxed, and whitespace control must match or the rendered text (and the ids) would differ.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _plain_messages(messages: list[dict]) -> list[dict]:
    # As transformers does: keys whose value is None are dropped (templates handle a missing key, not
    # `content=None`), and a message's reasoning is offered under both names templates read.
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Tokenizer:
    def __init__(self, source_dir: Path, tok: _HFTokenizer, config: dict, generation_config: dict,
                 chat_template: str | None, chat_template_is_default: bool = False):
        self.source_dir = source_dir
        self.generation_config = generation_config  # written beside an exported model
        self._tok = tok
        self.backend = tok  # the raw tokenizers.Tokenizer (fast batch encoding of corpora)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._chat_template_is_default = chat_template_is_default
        self._compiled = None  # (template source, compiled template), rebuilt if chat_template is reassigned
        # Strings the template sees as `bos_token`, `eos_token`, ...; only the ones the tokenizer defines.
        self.special_tokens = {n: _token_content(config[n]) for n in _SPECIAL_TOKEN_NAMES if config.get(n)}

        def token_id(name):
            token = self.special_tokens.get(name)
            return None if token is None else tok.token_to_id(token)

        gen_eos = generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.bos_id = token_id("bos_token")
        if self.bos_id is None:
            self.bos_id = generation_config.get("bos_token_id")
        self.eos_id = token_id("eos_token")
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        self.pad_id = token_id("pad_token")
        if self.pad_id is None:
            self.pad_id = self.eos_id  # pad positions are masked out of the loss, so any real id will do
        # Chat models often end a turn with a token other than the tokenizer's eos (e.g. Llama 3's <|eot_id|>);
        # generation_config.json lists all of them.
        self.stop_ids = {i for i in [self.eos_id, *gen_eos] if i is not None}

    @classmethod
    def from_dir(cls, path, default_chat_template: str | None = None) -> "Tokenizer":
        """Load a HF tokenizer folder. `default_chat_template` ("chatml", or a Jinja string) is used only when
        the folder has no chat template of its own."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found (handloom needs a fast tokenizer's tokenizer.json)")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            read_json(tok_file)  # names the line if the file is not JSON at all
            raise ValueError(f"{tok_file}: could not load the tokenizer: {e}") from None

        config = {}
        if (path / "special_tokens_map.json").is_file():  # older saves keep the special tokens here
            config.update(read_json(path / "special_tokens_map.json"))
        if (path / "tokenizer_config.json").is_file():
            config.update(read_json(path / "tokenizer_config.json"))
        generation_config = {}
        if (path / "generation_config.json").is_file():
            generation_config = read_json(path / "generation_config.json")

        # Newer transformers saves the template in its own file, which wins over the config entry.
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # [{name, template}, ...]: older saves of several named templates
            template = {t["name"]: t["template"] for t in template}.get("default")
        is_default = template is None and default_chat_template is not None
        if is_default:
            template = CHATML_TEMPLATE if default_chat_template == "chatml" else default_chat_template
        return cls(path, tok, config, generation_config, template, is_default)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # add_special_tokens applies tokenizer.json's post-processor, as AutoTokenizer does (Llama adds BOS).
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        # The Rust side encodes the batch on all cores, which is what makes corpus preparation fast.
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, out_dir) -> None:
        """Copy the tokenizer files next to a checkpoint, so HF tools load it as they loaded the original."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in _FILES_TO_SAVE:
            if (self.source_dir / name).is_file():
                shutil.copyfile(self.source_dir / name, out_dir / name)
        if self._chat_template_is_default:
            # The model is being trained on this template, so the checkpoint must carry it.
            (out_dir / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            **template_kwargs) -> str:
        """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` does. Extra keyword
        arguments (tools, enable_thinking, ...) become template variables."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.source_dir} has no chat template (no chat_template in tokenizer_config.json, no "
                "chat_template.jinja). Set the default_chat_template option (e.g. 'chatml', or a Jinja "
                "template string), i.e. Tokenizer.from_dir(path, default_chat_template='chatml')."
            )
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, _compile_template(self.chat_template))
        variables = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        return self._compiled[1].render(
            messages=_plain_messages(messages), add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    **template_kwargs) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation, and a mask that is True on the tokens the assistant wrote
        (its content and its end-of-turn token; not role headers, not the newline after the turn)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        # The template writes its own special tokens, so the post-processor must not add more.
        encoding = self._tok.encode(text, add_special_tokens=False)
        spans = self._assistant_spans(messages, text, **template_kwargs)
        # A token is the assistant's if its characters overlap a span. Spans and tokens are both in order,
        # so one pass suffices.
        mask, k = [], 0
        for start, end in encoding.offsets:
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(k < len(spans) and end > spans[k][0])
        return encoding.ids, mask

    def _assistant_spans(self, messages: list[dict], full: str, **kw) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `full`, found by rendering prefixes of the conversation.

        For assistant message i, `header` = render(messages[:i], add_generation_prompt=True) is the prompt a
        model would continue at inference, and `turn` = render(messages[:i+1]); what the assistant wrote is
        `own` = turn minus its common prefix with header (everything after the generation prompt, including
        template-inserted text such as an empty <think> block, which the model must generate). The turn starts
        where `full` stops agreeing with `header`, and there:
          1. `full` usually continues with `own` exactly.
          2. Some templates render a turn differently once later messages follow (Qwen3 drops the <think>
             block of earlier turns, or adds an empty one after the header). If `full` agrees with everything
             before the turn, the turn itself was rewritten: take the longest suffix of `own` that `full`
             continues with (the content and end-of-turn token, which templates leave alone).
          3. Some templates rewrite earlier text (Mistral's put the system prompt in the last user message
             only): `own` is then what an empty reply changes in `turn`, searched for after the previous turn.
        Trailing whitespace after the end-of-turn token is left out: it belongs with the next turn's header.
        """
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            try:
                header = self.apply_chat_template(messages[:i], add_generation_prompt=True, **kw)
                context = self.apply_chat_template(messages[:i], **kw)
                turn = self.apply_chat_template(messages[: i + 1], **kw)
                own_start = _common_prefix_len(header, turn)
                if own_start < len(context):
                    # The template rendered the earlier messages differently once this turn was added, so the
                    # header does not delimit the turn; an empty reply rendered in the same place does.
                    blank = self.apply_chat_template([*messages[:i], {**message, "content": ""}], **kw)
                    own_start = _common_prefix_len(blank, turn)
            except jinja2.TemplateError as e:
                raise ValueError(f"cannot render the conversation before assistant message {i}: {e}") from e
            own = turn[own_start:]
            if not own.strip():
                continue
            start = _common_prefix_len(full, header)

            found = None
            if start >= cursor and full.startswith(own, start):  # 1
                found = (start, start + len(own))
            elif start >= cursor and start >= len(context):  # 2
                k = next(k for k in range(len(own) + 1) if full.startswith(own[k:], start))
                if own[k:].strip():
                    found = (start, start + len(own) - k)
            if found is None and (p := full.find(own, cursor)) >= 0:  # 3
                found = (p, p + len(own))
            if found is None:
                raise ValueError(
                    f"cannot locate assistant message {i} in the rendered conversation: the chat template renders "
                    f"it as {own!r} on its own, and differently in the full conversation"
                )
            start, end = found
            while end > start and full[end - 1].isspace():
                end -= 1
            spans.append((start, end))
            cursor = end
        return spans
