"""Train llmc's small test model: a Llama-architecture model with GQA on Tiny Shakespeare.

Why: quantization error on random weights means nothing; accuracy tests need a model that has
something to lose. This script makes it deterministically (fixed seeds, one thread order) on CPU
and writes a real HF directory (config.json, model.safetensors in FP16, tokenizer) to
compiler/data/llmc-tiny-shakespeare/, which llmc ships. Provenance (corpus hash, seed, steps,
losses, wall time) goes to TRAINING.json beside the weights.

    python tools/train_tiny_shakespeare.py [--steps 600] [--out compiler/data/llmc-tiny-shakespeare]
    python tools/train_tiny_shakespeare.py --draft --batch 32 --out DIR   # its speculative-decoding draft

The draft (`--draft`, DRAFT_ARCH) is a 5x smaller model on the same corpus, split and tokenizer
(the tokenizer is trained deterministically from the same text, so `llmc generate --speculate
draft` accepts it: same vocabulary). Two layers and two KV heads: the export of a one-layer,
one-KV-head variant kept a Shape(attention_mask), so its graph had no fixed-capacity cache to run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from compiler.frontend.corpus import CORPUS_SHA256, split_corpus

ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, rope_theta=10000.0,
            tie_word_embeddings=False)
DRAFT_ARCH = dict(ARCH, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def make_tokenizer(train_text: str, vocab_size: int):
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_text.split("\n\n"), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, help="[default: compiler/data/llmc-tiny-shakespeare, -draft with --draft]")
    ap.add_argument("--draft", action="store_true", help="train the smaller draft model (DRAFT_ARCH) instead")
    args = ap.parse_args()
    arch = DRAFT_ARCH if args.draft else ARCH
    args.out = args.out or Path("compiler/data/llmc-tiny-shakespeare" + ("-draft" if args.draft else ""))

    torch.manual_seed(args.seed)
    train_text, heldout_text = split_corpus()
    tokenizer = make_tokenizer(train_text, arch["vocab_size"])
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    held_ids = torch.tensor(tokenizer(heldout_text)["input_ids"], dtype=torch.long)
    print(f"train tokens {len(train_ids)}, heldout tokens {len(held_ids)}", flush=True)

    config = transformers.LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(config).to(device)
    train_ids, held_ids = train_ids.to(device), held_ids.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            n = (len(held_ids) - 1) // args.seq
            x = held_ids[: n * args.seq].view(n, args.seq)[:64]
            loss = model(input_ids=x, labels=x).loss.item()
        model.train()
        return loss

    log, t0 = [], time.time()
    best = (float("inf"), -1, None)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = train_ids[starts.to(device)[:, None] + torch.arange(args.seq, device=device)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            held = heldout_loss()
            log.append({"step": step, "train_loss": round(loss.item(), 4), "heldout_loss": round(held, 4),
                        "wall_s": round(time.time() - t0, 1)})
            print(log[-1], flush=True)
            if held < best[0]:  # keep the checkpoint that generalizes best (the corpus is small)
                best = (held, step, {k: v.detach().clone() for k, v in model.state_dict().items()})

    args.out.mkdir(parents=True, exist_ok=True)
    model.load_state_dict(best[2])
    model = model.to("cpu", torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    final = {"heldout_loss": best[0], "step": best[1]}
    (args.out / "TRAINING.json").write_text(json.dumps({
        "script": "tools/train_tiny_shakespeare.py", "corpus": "Tiny Shakespeare (karpathy/char-rnn)",
        "corpus_sha256": CORPUS_SHA256, "split": "first 90% train, last 10% held out", "arch": arch,
        "params": n_params, "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "lr": args.lr, "torch": torch.__version__, "transformers": transformers.__version__,
        "heldout_perplexity_fp32": round(math.exp(final["heldout_loss"]), 2),
        "best_step": best[1], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "uniform_perplexity": arch["vocab_size"], "log": log, "wall_s": round(time.time() - t0, 1),
    }, indent=1) + "\n")
    print(f"wrote {args.out}; held-out perplexity {math.exp(final['heldout_loss']):.1f} (uniform {arch['vocab_size']})")


if __name__ == "__main__":
    main()
