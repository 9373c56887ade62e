import json

import pytest

from compiler.errors import BadInputError, UnsupportedModelError
from compiler.frontend.load import SUPPORTED_ARCHITECTURES, load_model, read_spec


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_reads_spec_of_each_supported_architecture(model_dirs, arch, cls):
    spec = read_spec(model_dirs[arch])
    assert spec.architecture == cls
    assert spec.num_kv_heads < spec.num_heads  # GQA
    assert spec.head_dim * spec.num_heads == spec.hidden_size


def test_load_gives_fp32_eval_model_and_tokenizer(llama):
    import torch

    assert not llama.model.training
    assert next(llama.model.parameters()).dtype == torch.float32
    assert llama.tokenizer("hello world").input_ids
    assert llama.num_parameters == sum(p.numel() for p in llama.model.parameters()) > 0


def test_missing_directory(tmp_path):
    with pytest.raises(BadInputError, match="model directory not found"):
        read_spec(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(BadInputError, match="no config.json"):
        read_spec(tmp_path)


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError) as err:
        read_spec(tmp_path)
    assert "GPT2LMHeadModel" in str(err.value)
    assert all(a in str(err.value) for a in SUPPORTED_ARCHITECTURES)


def test_remote_code_refused(model_dirs, tmp_path):
    cfg = json.loads((model_dirs["llama"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="--trust-remote-code"):
        read_spec(tmp_path)


def test_pickle_only_weights_refused(model_dirs, tmp_path):
    (tmp_path / "config.json").write_text((model_dirs["llama"] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        load_model(tmp_path)


def _half_checkpoint(tmp_path, dtype: str, tie: bool = False):
    """A tiny Llama saved in `dtype` (as Hugging Face ships most checkpoints: BF16)."""
    import shutil

    import torch
    import transformers

    from compiler.frontend.default_model import make_tiny_model

    src = make_tiny_model(tmp_path / "fp32", num_layers=2)
    config = transformers.AutoConfig.from_pretrained(src)
    config.tie_word_embeddings = tie
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out = tmp_path / dtype
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("dtype,tie", [("bfloat16", True), ("float16", False)])
def test_a_half_checkpoint_loads_to_the_fp32_model_bit_for_bit(tmp_path, dtype, tie):
    """Loaded in its own dtype and, without half storage, upcast in place (one tensor at a time, mapped
    pages dropped): the same FP32 parameters, buffers and logits as Hugging Face's own FP32 load, ties
    kept. (With half storage, the default above HALF_STORAGE_ABOVE, see test_half_storage.py.)"""
    import torch
    import transformers

    from compiler.frontend.load import checkpoint_dtype

    path = _half_checkpoint(tmp_path, dtype, tie)
    assert checkpoint_dtype(sorted(path.glob("*.safetensors"))) == dtype
    ours = load_model(path, half_storage=False).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    assert all(mine[k].dtype == torch.float32 and torch.equal(mine[k], ref[k]) for k in ref)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_fp32_checkpoints_and_pickles_load_in_fp32(model_dirs, tmp_path):
    from compiler.frontend.load import checkpoint_dtype

    assert checkpoint_dtype(sorted(model_dirs["llama"].glob("*.safetensors"))) == "float32"
    assert checkpoint_dtype([tmp_path / "pytorch_model.bin"]) == "float32"  # pickles: no header to read


def test_half_storage_is_the_default_for_big_half_checkpoints_only(tmp_path, model_dirs, monkeypatch):
    from compiler.frontend.half_storage import is_half_stored

    half = _half_checkpoint(tmp_path, "bfloat16")
    assert not is_half_stored(load_model(half).model)  # small: FP32
    monkeypatch.setattr("compiler.frontend.load.HALF_STORAGE_ABOVE", 1)  # as if it were big
    assert is_half_stored(load_model(half).model)
    assert not is_half_stored(load_model(model_dirs["llama"]).model)  # an FP32 checkpoint: FP32 modules
