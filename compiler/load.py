"""Stage 1, load: read a local Hugging Face model directory into a reference PyTorch model.

Only safetensors and built-in architectures: a pickle `.bin` can execute code on load and
`trust_remote_code` runs the model author's Python, neither of which a compiler should do silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BadInputError, UnsupportedModelError
from .types import LoadedModel, ModelSpec

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def read_spec(path: Path) -> ModelSpec:
    """Read and check config.json without touching the weights (cheap: used for early errors)."""
    config_file = path / "config.json"
    if not path.exists():
        raise BadInputError(f"model directory not found: {path} (pass a local Hugging Face model directory)")
    if not path.is_dir():
        raise BadInputError(f"not a directory: {path} (pass a local Hugging Face model directory)")
    if not config_file.is_file():
        raise BadInputError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{config_file} is not valid JSON: {exc}") from exc
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else f"<none; model_type={cfg.get('model_type')!r}>"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch} in {config_file}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        spec = ModelSpec(
            architecture=arch,
            model_type=cfg.get("model_type", ""),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=_sliding_window(cfg),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"{config_file} lacks a required field or has a bad value: {exc}") from exc
    if spec.num_heads % spec.num_kv_heads:
        raise BadInputError(f"num_attention_heads={spec.num_heads} is not a multiple of num_key_value_heads={spec.num_kv_heads}")
    if cfg.get("auto_map"):
        raise UnsupportedModelError(f"{config_file} asks for remote code (auto_map); llmc never runs trust_remote_code")
    return spec


def _sliding_window(cfg: dict) -> int | None:
    """The attention window, where the config enables one (Mistral; Qwen2 with use_sliding_window)."""
    window = cfg.get("sliding_window")
    if not window or (cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False)):
        return None
    return int(window)


def _check_weights(path: Path) -> None:
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise UnsupportedModelError(
                f"{path} has only pickle weights (*.bin/*.pt); convert them to safetensors "
                "(e.g. model.save_pretrained(dir, safe_serialization=True))"
            )
        raise BadInputError(f"no *.safetensors weights in {path}")


def load_model(path: str | Path) -> LoadedModel:
    """Load config, safetensors weights and tokenizer; the model comes back in FP32 eval mode."""
    path = Path(path).expanduser().resolve()
    spec = read_spec(path)
    _check_weights(path)

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise many types; the message says which file
        raise BadInputError(f"cannot load the tokenizer from {path}: {exc}") from exc
    model_cls = getattr(transformers, spec.architecture)
    try:
        model = model_cls.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            attn_implementation="sdpa",
        )
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"cannot load weights from {path}: {exc}") from exc
    model.eval()
    return LoadedModel(
        path=path,
        name=path.name,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
