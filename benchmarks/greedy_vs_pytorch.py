"""Greedy text of a built artifact (`llmc generate`'s path: model.onnx through the generation runner)
against PyTorch FP32 greedy decoding of the original model, prompt by prompt.

Why: validation compares logits over a short prompt; this checks what a user sees, over as many
tokens as asked and over prompts longer than a sliding window (Gemma 3's local layers: 512), where
the kv-cache pass's windowed mask is what makes the compiled graph agree.

    python benchmarks/greedy_vs_pytorch.py ARTIFACT MODEL_DIR --max-new-tokens 32 \
        --prompt "The capital of France is" --corpus-prompt-tokens 600

Exit status 0 when every prompt's new tokens are identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corpus_prompt(tokenizer, tokens: int) -> str:
    """The start of the held-out Tiny Shakespeare split, cut to about `tokens` tokens of this tokenizer."""
    from compiler.frontend.corpus import split_corpus

    _, held_out = split_corpus()
    ids = tokenizer(held_out[: tokens * 8], add_special_tokens=False).input_ids[:tokens]
    return tokenizer.decode(ids)


def pytorch_greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """FP32 greedy decoding with HF's own cache, stopping at EOS like llmc's runner."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, top_k=None, top_p=None,
                             temperature=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--corpus-prompt-tokens", type=int, default=0, help="also a held-out-corpus prompt this long")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    import transformers

    from compiler.commands.generate import run_generate

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    prompts = list(args.prompt) + ([corpus_prompt(tokenizer, args.corpus_prompt_tokens)]
                                   if args.corpus_prompt_tokens else [])
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    same = True
    for prompt in prompts:  # one at a time: each is compared with an unpadded PyTorch run
        start = time.perf_counter()
        want = pytorch_greedy(model, tokenizer, prompt, args.max_new_tokens)
        torch_s = time.perf_counter() - start
        got = run_generate(args.artifact, [prompt], args.max_new_tokens, 0.0, 0, 0, "onnxruntime")
        tokens = got["tokens"][0]
        n = len(tokenizer(prompt).input_ids)
        match = tokens == want
        same &= match
        print(f"prompt of {n} tokens: {'IDENTICAL' if match else 'DIFFERENT'} over {len(want)} new tokens "
              f"(PyTorch FP32 {torch_s:.1f} s; llmc onnxruntime: ttft {got['ttft_s']:.2f} s, "
              f"{got['decode_tokens_per_s']:.1f} tokens/s)")
        print(f"  pytorch: {tokenizer.decode(want, skip_special_tokens=True)!r}")
        print(f"  llmc:    {got['texts'][0]!r}")
        if not match:
            first = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), min(len(tokens), len(want)))
            print(f"  first difference at new token {first}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
