import json

import pytest

from compiler.errors import BadInputError, UnsupportedModelError
from compiler.load import SUPPORTED_ARCHITECTURES, load_model, read_spec


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
