"""Models without a hub: the bundled trained default, and random tiny models of real architectures.

`llmc build` with no argument compiles the shipped trained model through exactly the same loader
path as a user's model (a real HF directory: config.json, model.safetensors, tokenizer.json).
`make_tiny_model` writes random tiny Llama / Qwen2 / Mistral / Qwen3 / Gemma 3 directories (fixed seed; the tokenizer
is a byte-level BPE trained on the text below) for the tests' architecture coverage.
"""

from __future__ import annotations

import os
from pathlib import Path


_CORPUS = """\
The compiler reads a model directory, exports a graph, rewrites it, and builds an engine.
Every stage hands a small typed object to the next one, and nothing reaches back.
A language model predicts the next token from the tokens before it, one step at a time.
The key and value cache keeps what attention has already computed, so decoding is cheap.
Grouped query attention shares each key and value head among several query heads.
Rotary position embeddings turn positions into rotations of pairs of channels.
Numbers in half precision carry about three decimal digits; accumulations need care.
Once upon a time there was a small model that wanted to run fast on a large machine.
It learned to count: one, two, three, four, five, six, seven, eight, nine, ten.
The quick brown fox jumps over the lazy dog while the engine warms its caches.
"""


def cache_root() -> Path:
    """Where llmc keeps generated models and timing caches (override with LLMC_CACHE)."""
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc"))


GEMMA3_TINY_WINDOW = 8


def make_tiny_model(
    out_dir: Path,
    architecture: str = "llama",
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    seed: int = 0,
    initializer_range: float = 0.08,
) -> Path:
    """Write a random tiny causal LM of a real architecture (llama, qwen2, mistral, qwen3, gemma3) as an HF directory.

    Used for the bundled default and by the tests. `initializer_range` is larger than HF's 0.02 so
    that logits are spread out and greedy decoding has clear winners instead of near-ties.
    """
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer(vocab_size)
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=False),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=4096),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=hidden_size // num_heads, use_sliding_window=False),
        # Gemma 3's traits at tiny size: local layers with a window shorter than the tests' sequences, a
        # global layer every second one, its own rope theta per layer type, MQA (one KV head, as the 270M
        # has), query_pre_attn_scalar unlike head_dim (so a wrong attention scale shows), tied embeddings.
        "gemma3": lambda: transformers.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True, "num_key_value_heads": 1}, head_dim=hidden_size // num_heads,
            query_pre_attn_scalar=hidden_size // num_heads * 3 // 4, sliding_window=GEMMA3_TINY_WINDOW,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]),
    }
    if architecture not in configs:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose from {sorted(configs)}")
    config = configs[architecture]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if architecture in ("qwen3", "gemma3"):
        # HF initialises norm weights to the identity (Gemma's to zero: its norm scales by 1 + w), which
        # makes every norm alike: the exporter then shares one scale initializer between them, and a
        # pass that folds into a norm's scale (AWQ) or a per-head q/k norm would go untested.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


TRAINED_MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "llmc-tiny-shakespeare"
TRAINED_DRAFT_DIR = TRAINED_MODEL_DIR.with_name("llmc-tiny-shakespeare-draft")
BUNDLED_DRAFT = "bundled"  # `llmc build --draft bundled`: the bundled model's own draft


def default_model_dir() -> Path:
    """The bundled default: the small *trained* Llama (GQA) shipped with llmc.

    Trained by tools/train_tiny_shakespeare.py on the shipped corpus (see compiler/frontend/corpus.py), so
    that quantization recipes have something to lose on the default build and `llmc generate`
    prints recognisable text. Loaded through the same loader as any user model.
    """
    if not (TRAINED_MODEL_DIR / "config.json").is_file() or not (TRAINED_MODEL_DIR / "model.safetensors").is_file():
        from compiler.errors import LlmcError
        raise LlmcError(f"the bundled model is missing from {TRAINED_MODEL_DIR}; reinstall llmc")
    return TRAINED_MODEL_DIR


def draft_dir(draft: str | Path) -> Path:
    """`--draft DIR`, or `--draft bundled`: the bundled model's speculative-decoding draft, a 5x smaller
    model trained by the same script on the same corpus and tokenizer (`--draft` in
    tools/train_tiny_shakespeare.py), so `llmc generate --speculate draft` works out of the box."""
    if str(draft) != BUNDLED_DRAFT:
        return Path(draft)
    if not (TRAINED_DRAFT_DIR / "model.safetensors").is_file():
        from compiler.errors import LlmcError
        raise LlmcError(f"the bundled draft is missing from {TRAINED_DRAFT_DIR}; reinstall llmc")
    return TRAINED_DRAFT_DIR
