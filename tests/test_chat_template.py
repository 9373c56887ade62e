"""`/v1/chat/completions`' prompt rendering (compiler/serving/chat_template.py) against transformers'
own `apply_chat_template` as the reference: the served token ids must be exactly the ones transformers
gives, with one BOS whether or not the tokenizer adds BOS itself."""

from __future__ import annotations

import json
import shutil

import pytest

from compiler.frontend.default_model import default_model_dir
from compiler.serving.chat_template import ChatTemplate, ChatUnavailable, parse_messages
from compiler.serving.openai_api import RequestInvalid, parse_chat
from compiler.serving.triton_models.tokenizer import ServingTokenizer

# Gemma's layout, with its BOS, role renaming and alternation check (raise_exception)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) and m['role'] != 'system' %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
            "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MESSAGES = [{"role": "user", "content": "Who is Romeo?"}, {"role": "assistant", "content": "A Montague."},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Juliet?"}]}]


def tokenizer_dir(tmp_path, adds_bos: bool, as_file: bool):
    d = tmp_path / f"tok-{adds_bos}-{as_file}"
    shutil.copytree(default_model_dir(), d, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    if as_file:
        (d / "chat_template.jinja").write_text(TEMPLATE)
    else:
        config["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if adds_bos:  # a post-processor that puts <s> first, as Llama's and Gemma's do
        tok = json.loads((d / "tokenizer.json").read_text())
        bos = next(t for t in tok["added_tokens"] if t["content"] == "<s>")
        tok["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                          {"Sequence": {"id": "B", "type_id": 0}}],
                                 "special_tokens": {"<s>": {"id": "<s>", "ids": [bos["id"]], "tokens": ["<s>"]}}}
        (d / "tokenizer.json").write_text(json.dumps(tok))
    return d


@pytest.mark.parametrize("adds_bos", [False, True])
@pytest.mark.parametrize("as_file", [False, True])
def test_served_ids_equal_transformers_apply_chat_template(tmp_path, adds_bos, as_file):
    from transformers import AutoTokenizer

    d = tokenizer_dir(tmp_path, adds_bos, as_file)
    reference = AutoTokenizer.from_pretrained(d, local_files_only=True)
    want = reference.apply_chat_template(parse_messages({"messages": MESSAGES}), tokenize=True,
                                         add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    served = ServingTokenizer(d).encode(ChatTemplate(d).render(parse_messages({"messages": MESSAGES})))
    bos = reference.convert_tokens_to_ids("<s>")
    assert served == list(want)
    assert served.count(bos) == 1 and served[0] == bos  # one BOS, first, either way
    assert reference.decode(served).endswith("<start_of_turn>model\n")


def test_a_template_refusal_and_bad_messages_are_client_errors(tmp_path):
    template = ChatTemplate(tokenizer_dir(tmp_path, False, False))
    with pytest.raises(RequestInvalid, match="roles must alternate"):
        parse_chat({"messages": [{"role": "assistant", "content": "hi"}]}, 8, template)
    for bad, why in (({"messages": []}, "non-empty list"), ({"messages": [{"content": "x"}]}, "string 'role'"),
                     ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
                     ({"messages": [{"role": "user", "content": 3}]}, "must be a string")):
        with pytest.raises(RequestInvalid, match=why):
            parse_chat(bad, 8, template)
    args = parse_chat({"messages": MESSAGES[:1], "max_tokens": 5, "stream": True}, 8, template)
    assert args["text_input"].endswith("<start_of_turn>model\n") and args["max_tokens"] == 5 and args["stream"]


def test_a_model_without_a_template_is_refused_with_the_fix():
    with pytest.raises(ChatUnavailable, match="no chat template .*use /v1/completions"):
        ChatTemplate(default_model_dir()).render([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatUnavailable, match="without the model's tokenizer"):
        parse_chat({"messages": MESSAGES}, 8, None)
