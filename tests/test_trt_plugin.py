"""plugins/trt_plugin.py: importable anywhere; registers only on full TensorRT; its Triton AOT compile and
argument order match what TensorRT's AOT launcher passes (node inputs, extra int32s, node outputs)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.errors import BackendBuildError
from plugins import trt_plugin

REASON = trt_plugin.unavailable_reason()
HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[1]


def aot_compile(*args, **kwargs) -> dict:
    """`compile_kernel(*args, **kwargs)` for sm_90 in a fresh interpreter: what it compiled.

    Why a fresh process: Triton decorates its language helpers (tl.cdiv, ...) once per process, in the
    mode TRITON_INTERPRET had at their first import, and its compiler then asserts they are compiled-mode
    functions; test_attention_kernel.py runs in the interpreter and may share this worker."""
    code = ("import json, sys\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from plugins import trt_plugin\n"
            "args, kwargs = json.loads(sys.argv[1])\n"
            "c = trt_plugin.compile_kernel(*args, **kwargs, target=GPUTarget('cuda', 90, 32))\n"
            "print(json.dumps({'name': c.metadata.name, 'ptx': c.asm['ptx'], 'num_warps': c.metadata.num_warps,\n"
            "                  'global_scratch_size': getattr(c.metadata, 'global_scratch_size', 0)}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps([args, kwargs])], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_reports_why_it_cannot_register_here_or_registers():
    if REASON is None:
        import tensorrt as trt

        trt_plugin.register()
        creator = trt.get_plugin_registry().get_creator(trt_plugin.PLUGIN_NAME, "1", trt_plugin.PLUGIN_NAMESPACE)
        assert creator is not None
        return
    assert any(word in REASON for word in ("TensorRT", "tensorrt", "triton"))
    with pytest.raises(BackendBuildError, match="cannot register the llmc::PagedAttention plugin"):
        trt_plugin.register()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the kernel module defines no kernels without it)")
def test_kernel_arguments_follow_tensorrt_aot_order():
    from plugins.attention_kernel import _plugin_kernel_trt

    names = list(inspect.signature(_plugin_kernel_trt.fn).parameters)
    runtime = list(trt_plugin.triton_signature(fp8=True))
    assert names[: len(runtime)] == runtime
    # node inputs (8, in the pass's order), then the extra int32s, then the node outputs (3)
    assert runtime[:8] == ["Q", "Knew", "Vnew", "Kc", "Vc", "Pos", "KScale", "VScale"]
    assert runtime[8:10] == ["Q_LEN", "CAP"] and runtime[10:] == ["Out", "KcOut", "VcOut"]
    consts = trt_plugin.triton_constants(0.1, 0, 8, 2, 64, True)
    assert set(names[len(runtime):]) == set(consts)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the kernel module defines no kernels without it)")
def test_paged_kernel_arguments_follow_tensorrt_aot_order():
    """PagedAttentionBlockTable: block_tables is the ninth node input, so BT follows VScale; CAP is the table width."""
    from plugins.attention_kernel import _plugin_kernel_trt_paged

    names = list(inspect.signature(_plugin_kernel_trt_paged.fn).parameters)
    runtime = list(trt_plugin.triton_signature(fp8=False, paged=True))
    assert names[: len(runtime)] == runtime
    assert runtime[:9] == ["Q", "Knew", "Vnew", "Kc", "Vc", "Pos", "KScale", "VScale", "BT"]
    assert runtime[9:11] == ["Q_LEN", "CAP"] and runtime[11:] == ["Out", "KcOut", "VcOut"]
    assert trt_plugin.triton_signature(fp8=True, paged=True)["BT"] == "*i32"
    consts = trt_plugin.triton_constants(0.1, 0, 8, 2, 64, False, page=16)
    assert set(names[len(runtime):]) == set(consts) and consts["PAGE"] == 16


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no AOT compile possible")
def test_aot_compile_for_hopper_without_a_gpu():
    """Compiles the FP16-cache variant for sm_90 to PTX on the CPU (what the engine build embeds)."""
    compiled = aot_compile(0.125, 4096, 32, 8, 128, fp8=False)
    assert compiled["name"] in compiled["ptx"] and ".target sm_90" in compiled["ptx"]
    assert compiled["num_warps"] == trt_plugin.NUM_WARPS
    assert compiled["global_scratch_size"] == 0  # nothing for TensorRT to allocate



@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no AOT compile possible")
def test_paged_aot_compile_for_hopper_without_a_gpu():
    """The paged FP8 variant (block 16) compiles for sm_90 to PTX on the CPU, with nothing for TensorRT to allocate."""
    compiled = aot_compile(0.125, 0, 32, 8, 128, fp8=True, page=16)
    assert compiled["name"] in compiled["ptx"] and ".target sm_90" in compiled["ptx"]
    assert compiled["global_scratch_size"] == 0


class StandInShapeExpr:
    """A stand-in for `tensorrt.plugin.ShapeExpr` (no full TensorRT here), following its documented API
    (NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/plugin/_tensor.py): `is_constant` is a property,
    `constant_value()` a method that raises RuntimeError on a symbolic dim."""

    def __init__(self, value: int | None):
        self._value = value

    @property
    def is_constant(self) -> bool:
        return self._value is not None

    def constant_value(self) -> int:
        if not self.is_constant:
            raise RuntimeError("Not accessible for non-constant shape expressions. Check is_constant")
        return self._value


class StandInTensorDesc:
    def __init__(self, *dims):
        self.shape_expr = [StandInShapeExpr(d) for d in dims]


def test_node_dims_reads_static_dims_through_the_shape_expr_api():
    """The AOT callbacks' compile-time constants are ints (not bound methods), in compile_kernel's parameter names."""
    query, past = StandInTensorDesc(None, 32, None, 128), StandInTensorDesc(None, 8, 4096, 128)
    dims = trt_plugin.node_dims(query, past)
    assert dims == {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
    assert all(type(v) is int for v in dims.values())
    pool = StandInTensorDesc(None, 8, 16, 128)
    assert trt_plugin.node_dims(query, pool, paged=True) == {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "page": 16}
    assert set(trt_plugin.node_dims(query, pool, paged=True)) <= set(inspect.signature(trt_plugin.compile_kernel).parameters)


def test_node_dims_refuses_a_symbolic_head_count():
    with pytest.raises(BackendBuildError, match="KV head count is dynamic"):
        trt_plugin.node_dims(StandInTensorDesc(None, 32, None, 128), StandInTensorDesc(None, None, 64, 128))


def test_triton_version_is_checked_against_nvidia_pin_for_the_tensorrt():
    """quickly_deployable_plugins pins triton 3.2.0 for TensorRT 10.10-10.15 and 3.5.0 from 10.16."""
    assert trt_plugin.pinned_triton("10.9.0.34") is None
    assert trt_plugin.pinned_triton("10.13.3.9") == (3, 2) and trt_plugin.pinned_triton("10.15.1") == (3, 2)
    assert trt_plugin.pinned_triton("10.16.0.72") == (3, 5) and trt_plugin.pinned_triton("11.1.0") == (3, 5)
    assert trt_plugin.triton_version_problem("10.16.0.72", "3.5.1") is None
    assert trt_plugin.triton_version_problem("10.14.1", "3.2.0") is None
    problem = trt_plugin.triton_version_problem("10.16.0.72", "3.9.0")
    assert "triton 3.9.0" in problem and "tensorrt 10.16.0.72" in problem and "triton==3.5.*" in problem
    assert "triton==3.2.*" in trt_plugin.triton_version_problem("10.14.1", "3.5.0")


def test_launch_grid_follows_the_kernels_program_ids():
    """_launch with a stand-in `tensorrt.plugin` (KernelLaunchParams with grid_x/y/z, block_x, shared_mem:
    plugin/_tensor.py; cdiv: plugin/_top_level.py): grid (ceil(S / BLOCK_M), Hq, B) as the kernel reads
    program_id(0..2), block = num_warps x 32 threads."""
    from types import SimpleNamespace

    trtp = SimpleNamespace(KernelLaunchParams=SimpleNamespace, cdiv=lambda a, b: ("cdiv", a, b))
    batch, heads, seq = StandInShapeExpr(None), StandInShapeExpr(32), StandInShapeExpr(None)
    query = SimpleNamespace(shape_expr=[batch, heads, seq, StandInShapeExpr(128)])
    compiled = SimpleNamespace(metadata=SimpleNamespace(num_warps=trt_plugin.NUM_WARPS, shared=4096))
    launch = trt_plugin._launch(trtp, query, compiled)
    assert launch.grid_x == ("cdiv", seq, trt_plugin.BLOCK_M)
    assert launch.grid_y is heads and launch.grid_z is batch
    assert launch.block_x == trt_plugin.NUM_WARPS * 32 and launch.shared_mem == 4096
    if HAS_TRITON:  # the grid as the kernels read it (both plugin kernels run _plugin_body)
        from plugins.attention_kernel import _plugin_body

        src = inspect.getsource(_plugin_body.fn)
        assert src.index("mblock = tl.program_id(0)") < src.index("h = tl.program_id(1)") < src.index(
            "b = tl.program_id(2)")
