"""Load (the load stage): read a local Hugging Face model directory into a reference PyTorch model.

Only safetensors and built-in architectures by default: a pickle `.bin` can execute code on load
and `trust_remote_code` runs the model author's Python, so each needs its own explicit flag.
The checks here that read no weights (`check_model_files`) run before any output exists, so a
broken directory fails in a second with a one-line message rather than minutes into a build.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from compiler.errors import BadInputError, UnsupportedModelError
from compiler.input_schema import CONFIG_FIX, check_config, check_config_identity, check_tokenizer_json, read_json
from compiler.host.paths import model_directory, regular_file
from compiler.frontend.model import LoadedModel, ModelSpec

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM",
                           "Gemma3ForCausalLM")


def read_spec(path: Path, trust_remote_code: bool = False) -> ModelSpec:
    """Read and check config.json without touching the weights (cheap: used for early errors)."""
    path = model_directory(path)
    config_file = path / "config.json"
    if not (config_file.exists() or config_file.is_symlink()):
        raise BadInputError(f"no config.json in {path}: not a Hugging Face model directory")
    cfg = check_config_identity(read_json(config_file, CONFIG_FIX), config_file)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else f"<none; model_type={cfg.get('model_type')!r}>"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch} in {config_file}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    check_config(cfg, config_file)  # every field's type and range: input_schema.py
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
            layer_windows=_layer_windows(cfg),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"{config_file} lacks a required field or has a bad value: {exc}") from exc
    if spec.num_heads % spec.num_kv_heads:
        raise BadInputError(f"num_attention_heads={spec.num_heads} is not a multiple of num_key_value_heads={spec.num_kv_heads}")
    if cfg.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            f"{config_file} asks for remote code (auto_map); llmc runs a model's own Python only with "
            "--trust-remote-code (it executes that code with your permissions)"
        )
    return spec


LAYER_TYPES = ("sliding_attention", "full_attention")


def _layer_types(cfg: dict) -> list[str] | None:
    """Each layer's attention type as transformers derives it, or None for "the window on every layer".

    `layer_types` when the config has it; otherwise what transformers' config classes fill in, so that
    older configs without the field (Gemma 3 checkpoints on the Hub with `sliding_window_pattern`,
    Qwen2 with `use_sliding_window` and `max_window_layers`) get the same global layers as PyTorch:
    windowing a global layer would change its output past the window, unseen by a short validation.
    """
    layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if not types:
        model_type = cfg.get("model_type")
        if model_type in ("gemma3", "gemma3_text"):  # Gemma3TextConfig: every `pattern`-th layer is global
            pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        elif model_type in ("qwen2", "qwen3"):  # Qwen2Config: layers from max_window_layers on slide
            first = int(cfg.get("max_window_layers", 28))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        else:
            return None
    if len(types) != layers:
        raise BadInputError(f"config.json has {len(types)} layer_types for {layers} layers; use the config "
                            "that came with the weights")
    unknown = sorted({t for t in types if t not in LAYER_TYPES})
    if unknown:
        raise BadInputError(f"config.json: field 'layer_types' holds {', '.join(map(repr, unknown))}; llmc knows "
                            f"{', '.join(LAYER_TYPES)}; use the config that came with the weights")
    return types


def _sliding_window(cfg: dict) -> int | None:
    """The attention window, where the config enables one on some layer (Mistral; Qwen2/Qwen3 with
    use_sliding_window; Gemma 3's local layers)."""
    window = cfg.get("sliding_window")
    if not window or (cfg.get("model_type") in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False)):
        return None
    types = _layer_types(cfg)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _layer_windows(cfg: dict) -> tuple[int, ...]:
    """Each layer's attention window (0 = full attention), for the kv-cache pass's per-layer masks:
    the window on the "sliding_attention" layers of `_layer_types`, or on every layer (Mistral)."""
    types = _layer_types(cfg)
    window = _sliding_window(cfg) or 0
    layers = int(cfg["num_hidden_layers"])
    if not window:
        return (0,) * layers
    if types is not None:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return (window,) * layers


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's length (truncation)."""
    size = file.stat().st_size
    fix = "re-download it or re-save the model with save_pretrained(safe_serialization=True)"
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInputError(f"{file} is truncated ({size} bytes, no safetensors header); {fix}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 << 20:
            raise BadInputError(f"{file} is corrupt or truncated (header length {length} > file size {size}); {fix}")
        try:
            header = json.loads(f.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise BadInputError(f"{file} is corrupt (unreadable safetensors header: {_first_line(exc)}); {fix}") from None
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise BadInputError(f"{file} is truncated: its header describes {expected} bytes but the file has {size}; {fix}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The files that hold the weights; pickle files only with allow_pickle."""
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            raise BadInputError(f"{index} is not a valid safetensors index: {_first_line(exc)}; re-download it") from None
        missing = sorted(n for n in named if not (path / n).is_file())
        if missing:
            raise BadInputError(f"{index} names shards missing from {path}: {', '.join(missing[:3])}; download them")
    if shards:
        return shards
    pickles = sorted(p for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if pickles and allow_pickle:
        return pickles
    if pickles:
        raise UnsupportedModelError(
            f"{path} has only pickle weights ({pickles[0].name}); convert them to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) or pass --allow-pickle if you trust the files "
            "(loading a pickle can execute code)"
        )
    raise BadInputError(f"no *.safetensors weights in {path}; pass a complete Hugging Face model directory")


def check_tokenizer_files(path: Path) -> None:
    if not any(all((path / name).is_file() for name in group) for group in TOKENIZER_SETS):
        raise BadInputError(
            f"no tokenizer in {path} (tokenizer.json, tokenizer.model or vocab.json + merges.txt); "
            "copy the tokenizer files of the original model into it"
        )


def check_model_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """Everything about the files that can be checked without loading weights: shards, headers, tokenizer."""
    files = weight_files(path, allow_pickle)
    for file in files:
        regular_file(file, "re-download it")  # a pipe named *.safetensors would block the read forever
        if file.suffix == ".safetensors":
            safetensors_header(file)
    check_tokenizer_json(path)
    check_tokenizer_files(path)
    return files


def check_weight_shapes(path: Path, model_cls, config, files: list[Path]) -> None:
    """Compare the safetensors shapes with what config.json implies, on a weightless (meta) model."""
    import torch

    with torch.device("meta"):
        skeleton = model_cls(config)
    stored = {}
    for file in files:
        if file.suffix == ".safetensors":
            stored.update({name: (tuple(t["shape"]), file.name) for name, t in safetensors_header(file).items()})
    if not stored:
        return  # pickle weights: no header to read without unpickling
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    for name, tensor in skeleton.state_dict().items():
        if name not in stored:
            if name not in tied:
                raise BadInputError(
                    f"config.json does not match the weights: {name} is missing from {path} "
                    "(wrong num_hidden_layers or architecture?); use the config that came with the weights"
                )
            continue
        shape, file = stored[name]
        if shape != tuple(tensor.shape):
            raise BadInputError(
                f"config.json does not match the weights: {name} is {list(shape)} in {file} but the config "
                f"implies {list(tensor.shape)}; use the config that came with the weights"
            )


_HALF_DTYPES = {"BF16": "bfloat16", "F16": "float16"}
HALF_STORAGE_ABOVE = 2 << 30  # FP32 bytes of the model from which half storage is the default (~540M params)


def checkpoint_dtype(files: list[Path]) -> str:
    """The half dtype every floating tensor of the safetensors shards is stored in, else "float32".

    Why: loaded straight in FP32, a BF16 checkpoint is converted while its mapped shard is resident
    (1B: 4.9 GB of FP32 beside a 2 GB shard, the build's peak). Loaded in its own dtype and then
    upcast one parameter at a time, the peak is the FP32 model alone; the values are the same (BF16
    and FP16 widen to FP32 exactly). A mixed or FP32 checkpoint, or pickles, load in FP32 directly.
    """
    dtypes = set()
    for file in files:
        if file.suffix != ".safetensors":
            return "float32"
        dtypes |= {t["dtype"] for t in safetensors_header(file).values() if t["dtype"].startswith(("F", "BF"))}
    return _HALF_DTYPES[dtypes.pop()] if len(dtypes) == 1 and next(iter(dtypes)) in _HALF_DTYPES else "float32"


def load_model(path: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False,
               half_storage: bool | None = None) -> LoadedModel:
    """Load config, weights and tokenizer; the model comes back in eval mode, computing in FP32.

    A BF16/FP16 checkpoint is loaded in its own dtype. With `half_storage` its Linear and Embedding
    weights stay half (compiler/frontend/half_storage.py: FP32 products from half the bytes; at 1B 2.5 GB
    instead of 4.9); everything else, and every weight without it, is upcast in place one tensor at a
    time (compiler/half_storage.upcast_in_place). None (the default): half storage when the FP32
    model would take HALF_STORAGE_ABOVE bytes or more. Below, the saving is small and the blocked
    products' many small kernels made a 135M reference run vary 2x in time (benchmarks/NOTES.md)."""
    path = Path(path).expanduser().resolve()
    spec = read_spec(path, trust_remote_code)
    files = check_model_files(path, allow_pickle)

    import torch
    import transformers

    from compiler.frontend.half_storage import store_half, upcast_in_place

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:  # first: AutoTokenizer reads config.json too, and would take the blame for it
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"cannot read {path / 'config.json'}: {_first_line(exc)}") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                               trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise many types; the message says which file
        raise BadInputError(f"cannot load the tokenizer from {path}: {_first_line(exc)}; check its tokenizer files") from exc
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    model_cls = transformers.AutoModelForCausalLM if remote else getattr(transformers, spec.architecture)
    if not remote:
        check_weight_shapes(path, model_cls, config, files)
    try:
        model = model_cls.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            use_safetensors=files[0].suffix == ".safetensors",
            dtype=getattr(torch, checkpoint_dtype(files)),
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"cannot load weights from {path}: {_first_line(exc)}") from exc
    if half_storage is None:
        half_storage = 4 * sum(p.numel() for p in model.parameters()) >= HALF_STORAGE_ABOVE
    if half_storage:
        store_half(model)
    else:
        upcast_in_place(model)
    model.eval()
    return LoadedModel(
        path=path,
        name=path.name,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
