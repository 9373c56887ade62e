"""`/v1/chat/completions`' prompt: the model's own chat template, rendered as transformers renders it.

A chat model was trained on one exact layout of turns (role markers, BOS, the assistant prefix), stored
with its tokenizer as a Jinja template (`chat_template` in tokenizer_config.json, or
chat_template.jinja since transformers 4.43). `apply_chat_template` renders it in a sandboxed Jinja
environment with `messages`, `add_generation_prompt` and the special tokens; this does the same with
jinja2 directly, because the OpenAI front end runs in `llmc serve`'s process, where importing
transformers (and torch) would cost ~26 s on a 2-core machine. A model whose tokenizer has no
template gets a 400 naming the file to add it to: guessing a layout would serve a silently worse model.

The rendered text usually starts with the BOS token (`{{ bos_token }}`); the serving tokenizer adds
BOS itself when its post-processor does, so a leading BOS is dropped from the text in that case
(two BOS tokens shift every position the model saw in training).
"""

from __future__ import annotations

import json
from pathlib import Path


class ChatUnavailable(ValueError):
    """This model cannot serve chat requests; the message says why and what to do."""


class ChatTemplate:
    def __init__(self, tokenizer_dir: Path):
        config_path = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one serves chat
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        jinja_file = tokenizer_dir / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text()
        self.source = source
        self.tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token",
                                                                        "unk_token")}
        self.bos_added = _adds_bos(tokenizer_dir, self.tokens["bos_token"])
        self._template = None
        self.error = ""
        if source:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise
            try:
                self._template = env.from_string(source)
            except TemplateError as exc:
                self.error = f"the model's chat template does not parse ({exc})"
                self._template = None

    @property
    def available(self) -> bool:
        return self._template is not None

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending with the assistant's turn prefix."""
        if not self.source:
            raise ChatUnavailable("this model's tokenizer has no chat template (tokenizer_config.json "
                                  "'chat_template' or chat_template.jinja): use /v1/completions, or add the "
                                  "template to the model directory and rebuild")
        if self._template is None:
            raise ChatUnavailable(self.error)
        from jinja2.exceptions import TemplateError

        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, **self.tokens)
        except TemplateError as exc:  # the template's own raise_exception: e.g. roles that do not alternate
            raise ValueError(f"the model's chat template refused these messages: {exc}") from exc
        bos = self.tokens["bos_token"]
        if self.bos_added and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


def _token_text(value) -> str:
    if isinstance(value, dict):  # an AddedToken as saved: {"content": "<bos>", ...}
        return value.get("content", "")
    return value or ""


def _adds_bos(tokenizer_dir: Path, bos: str) -> bool:
    """Whether the serving tokenizer's encode (compiler/serving/triton_models/tokenizer.py) puts BOS first."""
    if not bos or not (tokenizer_dir / "tokenizer.json").is_file():
        return False
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tokenizer.encode("x").ids
    return bool(ids) and ids[0] == tokenizer.token_to_id(bos)


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def parse_messages(body: dict) -> list[dict]:
    """OpenAI `messages`: a non-empty list of {role, content}; content a string or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": message["role"], "content": content})
    return out
