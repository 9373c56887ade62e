"""The model directory's JSON files and the build's numeric options, checked as a schema.

One table per file says, for every field llmc or transformers reads, its type and range; a value
outside it fails before any work with one line naming the file, the field, what is allowed and what
was found. Why a schema rather than checks where values are used: transformers validates a config
only when the tokenizer or the model is built, and AutoTokenizer reads config.json too, so a
malformed number in config.json surfaced as "cannot load the tokenizer", minutes into a build; and
Python's int() turns `Infinity` (valid in Python's JSON) into an OverflowError traceback.

Fields not in a table are left alone (configs carry many), so other architectures' fields are
added to `CONFIG_FIELDS` where they are supported. The upper bounds are far beyond any released
model and exist so that an extreme value fails here, not as an out-of-memory allocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from compiler.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class Field:
    """`kind`: int, number, bool, str, mapping, ids (an id or a list of ids), strs (non-empty list of strings),
    token (a string, or a mapping with a string `content`: tokenizer_config's special tokens)."""

    kind: str
    required: bool = False
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    choices: tuple | None = None  # the only values allowed (any JSON type), checked with their type
    nullable: bool = True  # an optional field may be null (transformers' default is then used)


_DIM = 1 << 16
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_accurate",
               "quick_gelu", "relu", "relu2", "relu6", "tanh", "sigmoid", "linear", "mish")

CONFIG_FIELDS: dict[str, Field] = {
    "architectures": Field("strs"),
    "model_type": Field("str"),
    "hidden_size": Field("int", required=True, low=1, high=_DIM),
    "num_hidden_layers": Field("int", required=True, low=1, high=1024),
    "num_attention_heads": Field("int", required=True, low=1, high=1024),
    "num_key_value_heads": Field("int", low=1, high=1024),
    "head_dim": Field("int", low=1, high=4096),
    "intermediate_size": Field("int", low=1, high=1 << 20),
    "vocab_size": Field("int", required=True, low=1, high=1 << 22),
    "max_position_embeddings": Field("int", low=1, high=1 << 24),
    "sliding_window": Field("int", low=0, high=1 << 24),
    "use_sliding_window": Field("bool"),
    "max_window_layers": Field("int", low=0, high=1024),
    "rms_norm_eps": Field("number", low=0, high=1),
    "rope_theta": Field("number", low=1e-6, high=1e12),
    "rope_parameters": Field("mapping"),
    "rope_scaling": Field("mapping"),
    "hidden_act": Field("str", choices=ACTIVATIONS),
    "hidden_activation": Field("str", choices=ACTIVATIONS),  # Gemma 3's name for it
    "layer_types": Field("strs"),  # Gemma 3, Qwen3: one per layer (compiler/frontend/load.py checks the names and count)
    "query_pre_attn_scalar": Field("number", low=1e-6, high=1e9),  # Gemma 3: attention scale ** -2
    "tie_word_embeddings": Field("bool"),
    "attention_bias": Field("bool"),
    "mlp_bias": Field("bool"),
    "attention_dropout": Field("number", low=0, high=1),
    "initializer_range": Field("number", low=0, high=1e3),
    "bos_token_id": Field("ids", low=0, high=1 << 22),
    "eos_token_id": Field("ids", low=0, high=1 << 22),
    "pad_token_id": Field("ids", low=0, high=1 << 22),
    "pretraining_tp": Field("int", low=1, high=1024),
    "use_cache": Field("bool"),
    "dtype": Field("str"),
    "torch_dtype": Field("str"),
    "auto_map": Field("mapping"),
}

_TOKEN = Field("token")
TOKENIZER_CONFIG_FIELDS: dict[str, Field] = {
    "bos_token": _TOKEN, "eos_token": _TOKEN, "pad_token": _TOKEN, "unk_token": _TOKEN,
    # transformers reads these without a None check: null is refused too
    "model_max_length": Field("number", low=1, nullable=False),
    "padding_side": Field("str", choices=("left", "right"), nullable=False),
    "truncation_side": Field("str", choices=("left", "right"), nullable=False),
    "add_bos_token": Field("bool", nullable=False),
    "add_eos_token": Field("bool", nullable=False),
    "clean_up_tokenization_spaces": Field("bool", nullable=False),
    "tokenizer_class": Field("str", nullable=False),
    "added_tokens_decoder": Field("mapping", nullable=False),
    "auto_map": Field("mapping", nullable=False),
}
SPECIAL_TOKENS_FIELDS = {"bos_token": _TOKEN, "eos_token": _TOKEN, "pad_token": _TOKEN, "unk_token": _TOKEN}
TOKENIZER_JSON_FIELDS = {"model": Field("mapping", required=True, nullable=False), "added_tokens": Field("list"),
                         "normalizer": Field("mapping"), "pre_tokenizer": Field("mapping"),
                         "decoder": Field("mapping"), "post_processor": Field("mapping")}
GENERATION_CONFIG_FIELDS = {"bos_token_id": CONFIG_FIELDS["bos_token_id"], "eos_token_id": CONFIG_FIELDS["eos_token_id"],
                            "pad_token_id": CONFIG_FIELDS["pad_token_id"]}
# The tokenizer-side JSON files that are checked when present (a missing one is the tokenizer check's concern).
TOKENIZER_FILES = {"tokenizer.json": TOKENIZER_JSON_FIELDS, "tokenizer_config.json": TOKENIZER_CONFIG_FIELDS,
                   "special_tokens_map.json": SPECIAL_TOKENS_FIELDS, "generation_config.json": GENERATION_CONFIG_FIELDS}

# A recipe's pass options (`{pass: quantize-int4-awq, block_size: 64, ...}`); each pass checks its own
# values further (block_size's allowed sizes) and rejects options it does not take.
PASS_OPTION_FIELDS = {"block_size": Field("int", low=1, high=1 << 16, nullable=False),
                      "targets": Field("patterns", nullable=False), "exclude": Field("patterns", nullable=False),
                      "include_lm_head": Field("bool", nullable=False),
                      "clip": Field("any", choices=(True, False), nullable=False),
                      "kv_dtype": Field("str", nullable=False)}

# CLI values: (low, high) inclusive. --max-seq needs room for a prompt token and a decode step.
BUILD_OPTION_RANGES = {"--max-batch": (1, 1 << 16), "--max-seq": (2, 1 << 20)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _in_range(value, field: Field) -> bool:
    return (field.low is None or value >= field.low) and (field.high is None or value <= field.high)


def _check(value: Any, field: Field) -> bool:
    kind = field.kind
    if kind == "int":
        return _is_int(value) and _in_range(value, field)
    if kind == "number":
        return _is_number(value) and _in_range(value, field)
    if kind == "bool":
        return isinstance(value, bool)
    if field.choices is not None:  # exact type too: true is not 1, 1.0 is not 1
        return any(value == c and type(value) is type(c) for c in field.choices)
    if kind == "str":
        return isinstance(value, str)
    if kind == "mapping":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "ids":
        ids = value if isinstance(value, list) else [value]
        return bool(ids) and all(_is_int(v) and _in_range(v, field) for v in ids)
    if kind == "strs":
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    if kind == "patterns":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "token":
        return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))
    raise AssertionError(f"unknown field kind {kind}")


def describe(field: Field) -> str:
    """What the field accepts, in words."""
    words = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
             "mapping": "a JSON object", "list": "a JSON list", "ids": "a token id or a list of token ids",
             "strs": "a non-empty list of names", "patterns": "a list of name patterns", "any": "a value", "token": "a string or an object with a string \"content\""}[field.kind]
    if field.choices:
        words = f"one of {', '.join(json.dumps(c) for c in field.choices)}"
    if field.low is not None and field.high is not None:
        words += f" in [{field.low:g}, {field.high:g}]"
    elif field.low is not None:
        words += f" >= {field.low:g}"
    return words + (" (or null)" if field.nullable and not field.required else "")


def _shown(value: Any) -> str:
    text = json.dumps(value, allow_nan=True, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(data: Any, fields: dict[str, Field], file: Path, fix: str) -> dict:
    """Check `data` (a parsed JSON file) against `fields`; returns it. Raises BadInputError naming file and field."""
    if not isinstance(data, dict):
        raise BadInputError(f"{file} must hold a JSON object, not {type(data).__name__} {_shown(data)}; {fix}")
    for name, field in fields.items():
        if name not in data:
            if field.required:
                raise BadInputError(f"{file} lacks the field '{name}' ({describe(field)}); {fix}")
            continue
        value = data[name]
        if value is None and field.nullable and not field.required:
            continue
        if not _check(value, field):
            raise BadInputError(f"{file}: field '{name}' must be {describe(field)}, got {_shown(value)}; {fix}")
    return data


def read_json(file: Path, fix: str) -> Any:
    """A JSON file's contents; unreadable, non-UTF-8 or malformed files fail naming the file."""
    from compiler.host.paths import read_bytes

    raw = read_bytes(file)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{file} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); {fix}") from None
    except RecursionError:
        raise BadInputError(f"{file} is nested too deeply to be a model file; {fix}") from None


CONFIG_FIX = "fix config.json or use the one that came with the weights"


def check_config_identity(cfg: Any, file: Path) -> dict:
    """config.json is an object whose `architectures` / `model_type` are well-typed: enough to tell an
    unsupported model (exit 3) apart, before its other fields are held to this schema."""
    return check_fields(cfg, {k: CONFIG_FIELDS[k] for k in ("architectures", "model_type")}, file, CONFIG_FIX)


def check_config(cfg: Any, file: Path) -> dict:
    """config.json: every known field's type and range, and the head arithmetic the graph relies on."""
    check_fields(cfg, CONFIG_FIELDS, file, CONFIG_FIX)
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise BadInputError(f"{file}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; "
                            f"{CONFIG_FIX}")
    if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
        raise BadInputError(f"{file}: hidden_size={cfg['hidden_size']} is not a multiple of num_attention_heads="
                            f"{heads} and there is no head_dim; {CONFIG_FIX}")
    return cfg


def check_tokenizer_json(model_dir: Path) -> None:
    """The tokenizer-side JSON files that are present: readable, JSON objects, known fields well-typed."""
    for name, fields in TOKENIZER_FILES.items():
        file = model_dir / name
        if file.exists() or file.is_symlink():
            fix = f"copy {name} of the original model into {model_dir}"
            check_fields(read_json(file, fix), fields, file, fix)


def check_build_options(values: dict[str, Any]) -> None:
    """CLI numbers (`{"--max-seq": 256, ...}`) against BUILD_OPTION_RANGES."""
    for option, value in values.items():
        low, high = BUILD_OPTION_RANGES[option]
        if not _is_int(value) or not low <= value <= high:
            raise BadInputError(f"{option} must be an integer in [{low}, {high}], got {value!r}")
