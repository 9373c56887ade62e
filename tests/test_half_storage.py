"""Half-stored weights computing in FP32 (compiler/frontend/half_storage.py): the FP32 model's numbers from
half the bytes. Compared with the same checkpoint loaded in FP32, which is the reference it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.frontend.lazy_weights import ParameterView
from compiler.frontend.half_storage import HalfStoredEmbedding, HalfStoredLinear, is_half_stored, restore_fp32, store_half

# FP32 summation order only: the widened weights are the FP32 model's exactly.
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    from test_load import _half_checkpoint

    return _half_checkpoint(tmp_path_factory.mktemp("half"), "bfloat16", tie=True)


def _models(path):
    import transformers

    fp32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    half = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    kept = store_half(half)
    return fp32, half, kept


def test_big_weights_stay_half_and_everything_else_is_fp32(bf16_dir):
    fp32, half, kept = _models(bf16_dir)
    assert is_half_stored(half) and not is_half_stored(fp32)
    linears = [m for m in half.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, HalfStoredLinear) and m.weight.dtype == torch.bfloat16 for m in linears)
    assert isinstance(half.model.embed_tokens, HalfStoredEmbedding)
    assert half.lm_head.weight is half.model.embed_tokens.weight  # tied: one half Parameter
    others = [p for n, p in half.named_parameters() if not n.endswith("proj.weight") and "embed" not in n]
    assert others and all(p.dtype == torch.float32 for p in others)
    assert all(b.dtype == torch.float32 for b in half.buffers() if b.is_floating_point())
    assert kept == sum(p.numel() * 2 for p in {id(p): p for p in half.parameters() if p.dtype == torch.bfloat16}.values())
    theirs = fp32.state_dict()
    assert all(torch.equal(v.float(), theirs[k]) for k, v in half.state_dict().items())  # the same values
    from compiler.host.memory import file_mappings, is_mapped

    spans = file_mappings(".safetensors")  # copied out of the shard mapping: its pages can be paged out
    assert not any(is_mapped(p.data_ptr(), 0, spans) for p in half.parameters())


def test_logits_and_greedy_decode_are_the_fp32_models(bf16_dir):
    fp32, half, _ = _models(bf16_dir)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 11, 250], [8, 9, 10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        a, b = fp32(ids).logits, half(ids).logits
        assert b.dtype == torch.float32
        assert float((a - b).abs().max()) <= REL_TOL * float(a.abs().max())
        ga = fp32.generate(ids[:1], max_new_tokens=12, do_sample=False)
        gb = half.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(ga, gb)


def test_a_bf16_activation_would_be_caught():
    """The tolerance above can fail: computing the same product with BF16 activations misses it."""
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((512, 256)).astype(np.float32)).bfloat16()
    x = torch.from_numpy(rng.standard_normal((4, 256)).astype(np.float32))
    layer = torch.nn.Linear(256, 512, bias=False)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.__class__ = HalfStoredLinear
    exact = x.double() @ w.double().t()
    ours = layer(x).double()
    sloppy = (x.bfloat16() @ w.t()).double()
    scale = float(exact.abs().max())
    assert float((ours - exact).abs().max()) <= REL_TOL * scale < float((sloppy - exact).abs().max())


def test_restore_fp32_gives_plain_modules(bf16_dir):
    fp32, half, _ = _models(bf16_dir)
    restore_fp32(half)
    assert not is_half_stored(half)
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               for m in half.modules() if isinstance(m, torch.nn.Linear))
    assert half.lm_head.weight is half.model.embed_tokens.weight
    assert all(torch.equal(v, fp32.state_dict()[k]) for k, v in half.state_dict().items())


@pytest.mark.parametrize("tie", [True, False])
def test_a_half_stored_model_exports_the_fp32_models_graph(tmp_path, tie):
    """Stamped export (6 layers) of the half-stored model: the traced layers restored to FP32, the
    stamped ones widened on read, the embedding traced through an FP32 stand-in and then viewed in
    BF16. Same nodes, same initializers, bit for bit, as the export of the same checkpoint loaded in
    FP32; onnxruntime gives the same logits. Tied (Gather + lm_head Transpose) and untied."""
    import onnx_ir as ir

    from compiler.frontend.export import export_onnx
    from compiler.frontend.load import load_model
    from helpers import feeds_with_past, run_onnx
    from test_load import _half_checkpoint

    import transformers

    src = _half_checkpoint(tmp_path / "a", "bfloat16", tie=tie)
    config = transformers.AutoConfig.from_pretrained(src)
    config.num_hidden_layers = 6
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = tmp_path / "deep"
    model.save_pretrained(path, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (path / f.name).write_bytes(f.read_bytes())
    half, full = load_model(path, half_storage=True), load_model(path, half_storage=False)
    assert is_half_stored(half.model)
    a, b = export_onnx(half, method="stamp").model, export_onnx(full, method="stamp").model
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph]
    assert a.graph.initializers.keys() == b.graph.initializers.keys()
    for name, value in b.graph.initializers.items():
        mine = a.graph.initializers[name]
        assert mine.dtype == value.dtype and np.array_equal(mine.const_value.numpy(), value.const_value.numpy()), name
    embed = half.model.model.embed_tokens
    assert isinstance(embed, HalfStoredEmbedding) and embed.weight.dtype == torch.bfloat16  # still half
    viewing = [v for v in a.graph.initializers.values() if isinstance(v.const_value, ParameterView)
               and v.const_value.torch_source().data_ptr() == embed.weight.data_ptr()]
    assert len(viewing) == 1 and len(viewing[0].uses()) == (2 if tie else 1)  # Gather (+ tied lm_head)
    assert is_half_stored(half.model)  # only the traced layers went back to FP32
    paths = []
    for tag, m in (("half", a), ("fp32", b)):
        paths.append(tmp_path / f"{tag}.onnx")
        ir.save(m, paths[-1])
    from compiler.frontend.export import graph_io

    feeds = feeds_with_past(graph_io(full), np.float32, batch=1, seq=3, past=2)
    x, y = run_onnx(paths[0], feeds), run_onnx(paths[1], feeds)
    assert all(np.array_equal(x[k], y[k]) for k in y)


def test_cast_fp16_converts_a_half_parameter_view_without_widening_it():
    """cast-fp16 reads a ParameterView's BF16/FP16 source directly: the same bits (NaN payloads
    included) as rounding its FP32 widening, for every BF16 and FP16 value, transposed views too."""
    import onnx_ir as ir

    from passes.cast_fp16 import _to_f16

    # Every 16-bit pattern, the first one 0x3F80 (BF16 1.0, whose FP16 bits differ): no element, the
    # first included, is right by accident.
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).roll(-(0x3F80 + 32768)).reshape(256, 256)
    assert patterns[0, 0] == 0x3F80
    for dtype in (torch.bfloat16, torch.float16):
        half = patterns.view(dtype)
        for transposed in (False, True):
            view = ParameterView(half, ir.DataType.FLOAT, "w", transposed=transposed)
            widened = ir.tensor((half.t() if transposed else half).float().numpy())
            ours, theirs = _to_f16(view).numpy(), _to_f16(widened).numpy()
            assert ours.dtype == np.float16 and ours.shape == theirs.shape
            assert np.array_equal(ours.view(np.int16), theirs.view(np.int16)), (dtype, transposed)
            assert np.array_equal(view.numpy(), widened.numpy(), equal_nan=True)  # what other readers see


def test_an_unexpected_use_of_the_stand_in_exports_again_in_fp32(tmp_path, monkeypatch, caplog):
    """If the exporter's graph does not use a stand-in as expected (here: one use more than the
    modules holding it), its values may have been read: the export warns, restores the embedding to
    FP32 and exports again, giving the FP32 model's graph."""
    import logging

    import compiler.frontend.half_storage as half_storage
    from compiler.frontend.export import export_onnx
    from compiler.frontend.load import load_model
    from test_load import _half_checkpoint

    path = _half_checkpoint(tmp_path, "bfloat16", tie=True)
    half, full = load_model(path, half_storage=True), load_model(path, half_storage=False)
    real = half_storage.fp32_stand_ins

    def miscounted(module):
        with real(module) as stand_ins:
            for s in stand_ins.values():
                s.users += 1
            yield stand_ins

    monkeypatch.setattr(half_storage, "fp32_stand_ins", half_storage.contextlib.contextmanager(miscounted))
    with caplog.at_level(logging.WARNING, logger="compiler.frontend.export"):
        a = export_onnx(half, method="full").model
    assert "did not use the stand-in" in caplog.text and "exporting with the embedding in FP32" in caplog.text
    assert half.model.model.embed_tokens.weight.dtype == torch.float32  # restored for the second export
    b = export_onnx(full, method="full").model
    assert a.graph.initializers.keys() == b.graph.initializers.keys()
    for name, value in b.graph.initializers.items():
        mine = a.graph.initializers[name].const_value
        assert not isinstance(mine, ParameterView) and np.array_equal(mine.numpy(), value.const_value.numpy()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_fp16_converts_a_sole_held_parameter_in_its_own_memory(dtype, monkeypatch):
    """A view that is the last holder of its parameter is rewritten as FP16 in place (chunk by chunk:
    3 chunks and a remainder here), with the copying path's bits; the spent view refuses reads. With
    another holder, or transposed, it is copied and the parameter is left as it was."""
    import onnx_ir as ir

    import passes.cast_fp16 as cast

    monkeypatch.setattr(cast, "_CHUNK", 20000)
    # Every 16-bit pattern, the first one 0x3F80 (BF16 1.0, whose FP16 bits differ): no element, the
    # first included, is right by accident.
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).roll(-(0x3F80 + 32768)).reshape(256, 256)
    assert patterns[0, 0] == 0x3F80
    expected = cast._to_f16(ir.tensor(patterns.view(dtype).float().numpy())).numpy().view(np.int16)

    src = patterns.clone().view(dtype)
    address = src.data_ptr()
    view = ParameterView(src, ir.DataType.FLOAT, "w")
    kept = cast._to_f16(view).numpy()  # `src` still holds the memory: a copy
    assert kept.ctypes.data != address and np.array_equal(kept.view(np.int16), expected)
    assert torch.equal(src.view(torch.int16), patterns)  # untouched
    del src
    transposed = ParameterView(patterns.clone().view(dtype), ir.DataType.FLOAT, "wt", transposed=True)
    assert cast._to_f16(transposed).numpy().ctypes.data != transposed.torch_source().data_ptr()  # copied, still readable

    ours = cast._to_f16(view).numpy()  # now the view is the only holder
    assert ours.dtype == np.float16 and ours.ctypes.data == address  # the parameter's own memory
    assert np.array_equal(ours.view(np.int16), expected)
    with pytest.raises(RuntimeError, match="handed over"):
        view.numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_after_the_model_is_dropped_the_embedding_is_cast_in_place(tmp_path, tie):
    """The driver's order: export a half-stored model, drop the model, cast-fp16. The embedding's
    BF16 memory becomes the FP16 initializer (no second copy), and every initializer is bit-identical
    to cast-fp16 of the FP32 load's export. If anything still held the embedding, this would copy.
    Untied, the lm_head's weight is a transposed view: copied, with the same bits."""
    import dataclasses
    import gc

    import onnx_ir as ir

    from compiler.frontend.export import export_onnx
    from compiler.frontend.load import load_model
    from passes.cast_fp16 import CastFp16Pass
    from test_load import _half_checkpoint

    src = _half_checkpoint(tmp_path, "bfloat16", tie=tie)
    half, full = load_model(src, half_storage=True), load_model(src, half_storage=False)
    address = half.model.model.embed_tokens.weight.data_ptr()
    a, b = export_onnx(half, method="stamp").model, export_onnx(full, method="stamp").model
    half = dataclasses.replace(half, model=None)
    gc.collect()
    CastFp16Pass()(a)
    CastFp16Pass()(b)
    in_place = [name for name, v in a.graph.initializers.items() if v.const_value.numpy().ctypes.data == address]
    assert len(in_place) == 1 and a.graph.initializers[in_place[0]].dtype == ir.DataType.FLOAT16
    for name, value in b.graph.initializers.items():
        mine = a.graph.initializers[name].const_value.numpy()
        assert mine.dtype == value.const_value.numpy().dtype and mine.tobytes() == value.const_value.numpy().tobytes(), name
