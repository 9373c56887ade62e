"""What the accuracy verdict's figures measure on a real checkpoint: INT4 vs a broken graph.

Why: the quantizing recipes' wiring check bounds the error *relative to the reference logits'
spread* (compiler/measure/validate.py, rel = rms(err) / std(reference logits) per position), and the verdict
rests on held-out quality (compiler/measure/verdict.py). Their thresholds need the figures of a real trained
model quantized to INT4 (which must pass) and of a broken model (which must fail). This script
measures both in PyTorch alone, so it runs on any Hugging Face causal LM transformers loads (Gemma 3
included, before llmc can compile it): decoder Linear weights fake-quantized with the same symmetric
block-wise RTN as passes/quantize_int4_rtn.py (the largest of 128/64/32 dividing K), and a "broken"
model whose token embedding rows are permuted (every layer right, the input wrong).

    python benchmarks/verdict_thresholds.py /work/models/gemma3-270m [--block 128] [--window 128] [--windows 16]

Prints, per variant: the validation prompt's max |logit error|, max and mean per-position rel error,
and on the held-out text (the quality stage's windows): perplexity delta, mean KL, next-token agreement.
"""

from __future__ import annotations

import argparse
import math

import torch


def fake_int4(weight: torch.Tensor, largest_block: int = 128) -> torch.Tensor:
    """[N, K] weight -> dequantized symmetric block-wise INT4 RTN along K."""
    n, k = weight.shape
    block = next((b for b in (128, 64, 32) if b <= largest_block and k % b == 0), None)
    if block is None:
        return weight
    w = weight.float().reshape(n, k // block, block)
    scale = (w.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-12)
    return (torch.clamp(torch.round(w / scale), -8, 7) * scale).reshape(n, k).to(weight.dtype)


def rel_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per position rms(err) / std(ref): >= 1 for logits uncorrelated with the reference, at any scale."""
    return (got - ref).pow(2).mean(-1).sqrt() / ref.std(-1)


def prompt_logits(model, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill + greedy decode of the reference, returned as one [positions, vocab] tensor of the logits."""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return model(torch.tensor([seq[:-1]])).logits[0].float(), seq


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiler.frontend.calibrate import tokenize_windows
    from compiler.frontend.corpus import default_eval_text
    from compiler.measure.validate import DEFAULT_PROMPT

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--block", type=int, default=128, help="largest INT4 block (128, 64 or 32)")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    windows = torch.tensor(tokenize_windows(tok, default_eval_text(), args.window, args.windows))
    torch.manual_seed(0)
    with torch.no_grad():
        ref_prompt, seq = prompt_logits(model, tok(DEFAULT_PROMPT).input_ids, 16)
        ref_logp = torch.cat([torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)[None] for w in windows])
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        variants = {
            f"int4-rtn (block {args.block})": lambda: [
                m.weight.copy_(fake_int4(m.weight, args.block)) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in name],
            "broken (embedding rows permuted)": lambda: model.get_input_embeddings().weight.copy_(
                model.get_input_embeddings().weight[torch.randperm(model.get_input_embeddings().weight.shape[0])]),
        }
        targets = windows[:, 1:]
        ref_nll = -ref_logp.gather(-1, targets[..., None]).mean()
        for label, apply in variants.items():
            for name, p in model.named_parameters():
                p.copy_(original[name])
            apply()
            got = model(torch.tensor([seq[:-1]])).logits[0].float()
            rel = rel_errors(got, ref_prompt)
            logp = torch.cat([torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)[None] for w in windows])
            nll = -logp.gather(-1, targets[..., None]).mean()
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
            agree = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()
            print(f"{label}: prompt max |err| {(got - ref_prompt).abs().max():.3f}, logit std "
                  f"{ref_prompt.std(-1).mean():.3f}, rel max {rel.max():.3f} mean {rel.mean():.3f}; held-out "
                  f"({windows.numel()} tokens, window {args.window}): ppl {math.exp(ref_nll):.3f} -> "
                  f"{math.exp(nll):.3f} ({math.exp(nll - ref_nll) - 1:+.2%}), KL {kl:.4f}, "
                  f"next-token agreement {agree:.1%}", flush=True)


if __name__ == "__main__":
    main()
