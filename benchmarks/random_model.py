"""Write a random causal LM of a real published shape, fast and in bounded memory.

Instantiating a 1B transformers model on the CPU and initialising it costs minutes on two cores
(a 0.5B one took 432 s). Here the model is built on the meta device only to learn tensor names and
shapes; each tensor is then filled with a seeded normal draw (norm weights with ones) in the
checkpoint dtype and written with safetensors, one shard at a time.

    python benchmarks/random_model.py llama-3.2-1b /tmp/scale/llama-3.2-1b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The published configs (random weights; vocab and RoPE as released).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}

SHARD_BYTES = 2 << 30


def write_random_model(shape: str, out_dir: Path, dtype: str = "bfloat16", seed: int = 0, std: float = 0.02) -> dict:
    """Write config.json, sharded safetensors and a small BPE tokenizer; return sizes and seconds."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from compiler.frontend.default_model import _make_tokenizer

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _make_tokenizer(512)
    torch_dtype = getattr(torch, dtype)
    config = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"],
                                      dtype=dtype)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, shp in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch_dtype)
        else:
            t = torch.empty(shp, dtype=torch.float32).normal_(0.0, std, generator=gen).to(torch_dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    index = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        index.update({k: fname for k in shard})
        shard.clear()
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"shape": shape, "parameters": params, "checkpoint_bytes": total, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(write_random_model(args.shape, args.out, args.dtype, args.seed)))


if __name__ == "__main__":
    main()
