"""PyTorch reference for llmc's custom attention: the semantics the Triton kernel and the plugin must match.

Why a reference: the kernel (plugins/attention_kernel.py) and the ONNX function body of the
`llmc::PagedAttention` node (passes/attention_plugin.py) are two more implementations of the same
maths; both are checked against this one, which is written for clarity (gather, dequantize, mask,
softmax in float32), not speed.

Conventions (shared by kernel, plugin and pass):
- q: [B, Hq, Sq, D]; query i of sequence b sits at position seq_lens[b] - Sq + i (the new tokens
  are the last Sq of the sequence, whose cache already holds them).
- Linear cache: [B, Hkv, S_cap, D]; position p of sequence b is k[b, :, p].
- Paged cache: a pool [num_blocks, Hkv, block_size, D] shared by all sequences, and a block table
  [B, max_blocks] of int32 block ids: position p of sequence b is pool[block_table[b, p // bs], :, p % bs].
- GQA: query head h reads KV head h // (Hq // Hkv) (the mapping of HF's repeat_kv).
- FP8 cache: float8_e4m3fn values with one float32 scale per KV head (separately for K and V);
  the real value is fp8 * scale. Scores are scaled by k_scale, the output by v_scale.
- Sliding window w > 0 (Mistral): a query at position p sees keys j with p - w < j <= p.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# --- FP8 per-head scales -------------------------------------------------------------------------

def fp8_scales(x: torch.Tensor, head_dim: int = 1, margin: float = 1.0) -> torch.Tensor:
    """One float32 scale per head (axis `head_dim` of x) so that amax(head) maps to FP8_MAX / margin."""
    dims = [d for d in range(x.dim()) if d != head_dim]
    amax = x.detach().abs().float().amax(dim=dims)
    return (amax * margin / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def _scale_shape(x: torch.Tensor, scale: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[head_dim] = scale.numel()
    return scale.float().reshape(shape)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """x / scale, saturated to +-FP8_MAX (E4M3 has no inf: an overflow would become NaN)."""
    y = x.float() / _scale_shape(x, scale, head_dim)
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    return q.float() * _scale_shape(q, scale, head_dim)


# --- Paged-cache block-table maths -----------------------------------------------------------------

def blocks_needed(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def physical_slot(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset in block) of each logical position; positions: [B, ...] int, block_table: [B, max_blocks]."""
    logical_block = positions // block_size
    flat = logical_block.reshape(positions.shape[0], -1).long()
    block = torch.gather(block_table.long(), 1, flat).reshape(positions.shape)
    return block, positions % block_size


def allocate_block_table(seq_lens: list[int], block_size: int, num_blocks: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """A block table that gives each sequence its own blocks in a shuffled pool (as an allocator would).

    Returns (block_table [B, max_blocks] int32, pool size). Unused table entries are 0, a valid id, so a
    kernel that reads past seq_len by mistake reads real but wrong data and tests catch it.
    """
    counts = [blocks_needed(n, block_size) for n in seq_lens]
    total = sum(counts)
    pool = max(num_blocks or total, total)
    order = torch.randperm(pool, generator=generator)[:total].to(torch.int32)
    table = torch.zeros(len(seq_lens), max(max(counts), 1), dtype=torch.int32)
    at = 0
    for b, n in enumerate(counts):
        table[b, :n] = order[at:at + n]
        at += n
    return table, pool


def linear_to_paged(cache: torch.Tensor, seq_lens: list[int], block_table: torch.Tensor, num_blocks: int,
                    block_size: int) -> torch.Tensor:
    """Copy a linear cache [B, Hkv, S, D] into a pool [num_blocks, Hkv, bs, D] laid out by block_table."""
    _, kv_heads, _, head_dim = cache.shape
    raw = _bytes(cache)
    pool = torch.zeros(num_blocks, kv_heads, block_size, head_dim, dtype=raw.dtype, device=cache.device)
    for b, n in enumerate(seq_lens):
        for j in range(blocks_needed(n, block_size)):
            lo, hi = j * block_size, min((j + 1) * block_size, n)
            pool[int(block_table[b, j]), :, : hi - lo] = raw[b, :, lo:hi]
    return pool.view(cache.dtype)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as uint8 for indexing (not every device implements gather/scatter on float8)."""
    return x.view(torch.uint8) if x.dtype == FP8_DTYPE else x


def paged_to_linear(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Gather the first `length` positions of every sequence: [B, Hkv, length, D]."""
    block_size = pool.shape[2]
    positions = torch.arange(length, device=block_table.device).expand(block_table.shape[0], length)
    block, offset = physical_slot(block_table, positions, block_size)
    gathered = _bytes(pool)[block, :, offset]  # [B, length, Hkv, D]
    return gathered.permute(0, 2, 1, 3).view(pool.dtype)


def write_paged(pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, new: torch.Tensor) -> None:
    """In-place cache update of a paged pool: new [B, Hkv, S, D] goes to positions [B, S]."""
    block, offset = physical_slot(block_table, positions, pool.shape[2])
    _bytes(pool)[block, :, offset] = _bytes(new.permute(0, 2, 1, 3).to(pool.dtype))


# --- Attention ----------------------------------------------------------------------------------

def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                        block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None, window: int = 0,
                        sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q over a (linear or paged, FP16/BF16/FP32 or FP8) cache; returns float32 [B, Hq, Sq, D]."""
    batch, q_heads, q_len, head_dim = q.shape
    seq_lens = torch.as_tensor(seq_lens, device=q.device).long()
    length = int(seq_lens.max())
    if block_table is not None:
        k = paged_to_linear(k_cache, block_table, length)
        v = paged_to_linear(v_cache, block_table, length)
    else:
        k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    kv_heads = k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    k = dequantize_fp8(k, k_scale) if k_scale is not None else k.float()
    v = dequantize_fp8(v, v_scale) if v_scale is not None else v.float()
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    scores = torch.einsum("bhsd,bhtd->bhst", q.float(), k) * scale
    mask = visible(seq_lens, q_len, length, window)  # [B, Sq, T]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def visible(seq_lens: torch.Tensor, q_len: int, length: int, window: int = 0) -> torch.Tensor:
    """[B, Sq, T] bool: key j is visible to query i of sequence b (causal, inside the window, inside the sequence)."""
    dev = seq_lens.device
    pos = seq_lens[:, None] - q_len + torch.arange(q_len, device=dev)[None, :]  # [B, Sq]
    key = torch.arange(length, device=dev)[None, None, :]
    mask = (key <= pos[:, :, None]) & (key < seq_lens[:, None, None])
    if window > 0:
        mask &= key > pos[:, :, None] - window
    return mask
