"""Paged attention over KV segments with prefix sharing (log-sum-exp merge), per layer, from the step's
`AttentionMetadata` (`batchllm.model.attention_meta`: parts, buckets, merge indices).

`paged_attention` writes this step's K/V into the cache, gathers each bucket's K/V with one index op, runs one fused
attention per bucket (which returns the log-sum-exp as well), runs the small or bf16 parts in the project's ragged
kernel straight from the paged cache, and merges each row's partial results in fp32: a token's attention is the
log-sum-exp merge of all parts that contain its row.
"""

from __future__ import annotations

import torch

from batchllm.model.attention_meta import AttentionMetadata, AttnBucket, AttnPart, RaggedParts

__all__ = ["AttentionMetadata", "AttnPart", "RaggedParts", "paged_attention", "write_kv"]


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write this step's K/V rows into ``kv_cache`` (in place) at ``meta.slot_mapping``."""
    n_kv, d = kv_cache.shape[-2], kv_cache.shape[-1]
    flat = kv_cache.view(2, -1, n_kv, d)  # [2, S, KVH, D]
    if meta.write_rows is not None:
        k = k.index_select(0, meta.write_rows)
        v = v.index_select(0, meta.write_rows)
    flat[0].index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    kv_written: bool = False,
) -> torch.Tensor:
    """Attention of the packed step over its KV segments.

    q: [T, H, D]; k, v: [T, KVH, D] of this step's tokens; kv_cache: [2, num_blocks, block_size, KVH, D] of this
    layer, written in place at ``meta``'s slot mapping before it is read (unless ``kv_written``: the caller already
    did). Returns [T, H, D] in q's dtype.
    """
    num_tokens, n_heads, d = q.shape
    n_kv = kv_cache.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads is not a multiple of {n_kv} KV heads")
    group = n_heads // n_kv
    if not kv_written:
        write_kv(k, v, kv_cache, meta)
    flat = kv_cache.view(2, -1, n_kv, d)  # [2, S, KVH, D]

    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for index, bucket in enumerate(meta.buckets):
        b, lq, lk = bucket.batch, bucket.q_len, bucket.kv_len
        if bucket.causal_square:
            out, lse = _attend_square_causal(q, flat, bucket, meta, scale)
            outs.append(out.index_select(0, bucket.sel))
            lses.append(lse.index_select(0, bucket.sel))
            continue
        qb = q.index_select(0, bucket.q_index).view(b, lq, n_kv, group, d)  # [B, Lq, KVH, G, D]
        qb = qb.permute(0, 2, 1, 3, 4).reshape(b, n_kv, lq * group, d)  # [B, KVH, Lq*G, D]
        buf = meta.kv_buffer(2 * b * lk * n_kv * d, kv_cache.dtype, kv_cache.device)
        kvb = torch.index_select(flat, 1, bucket.kv_index, out=buf.view(2, b * lk, n_kv, d))  # [2, B*Lk, KVH, D]
        kvb = kvb.view(2, b, lk, n_kv, d).to(q.dtype)
        kb = kvb[0].permute(0, 2, 1, 3)  # [B, KVH, Lk, D]
        vb = kvb[1].permute(0, 2, 1, 3)  # [B, KVH, Lk, D]
        mask = meta.additive_mask(index, q.dtype, group)  # [B, 1, Lq*G, Lk] or None
        out, lse = _attend(qb, kb, vb, mask, scale)  # [B, KVH, Lq*G, D], [B, KVH, Lq*G] fp32
        out = out.view(b, n_kv, lq, group, d).permute(0, 2, 1, 3, 4).reshape(b * lq, n_heads, d)  # [B*Lq, H, D]
        lse = lse.view(b, n_kv, lq, group).permute(0, 2, 1, 3).reshape(b * lq, n_heads)  # [B*Lq, H]
        outs.append(out.index_select(0, bucket.sel))
        lses.append(lse.index_select(0, bucket.sel))
    if meta.ragged is not None:
        r = meta.ragged
        if r.attend is None:
            raise RuntimeError("ragged attention parts need the CPU kernels, which are not built")
        qk = q if q.stride(2) == 1 and q.stride(1) == d else q.contiguous()  # rows may be strided (views of qkv)
        out, lse = r.attend(qk, kv_cache.view(2, -1, n_kv, d), r.q_ptr, r.q_rows, r.kv_ptr, r.kv_slots,
                            r.kv_start, r.q_pos, meta.window, scale)  # [NQ, H, D] fp32, [NQ, H] fp32
        if not outs and q.dtype in (torch.bfloat16, torch.float32) and r.merge is not None:  # fused merge, placement
            return r.merge(out, lse, meta.merge_index, q.dtype == torch.float32)  # [T, H, D]
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return _merge(outs, lses, meta, q)


def _attend_square_causal(q: torch.Tensor, flat: torch.Tensor, bucket: AttnBucket, meta: AttentionMetadata,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal-square bucket: heads unfolded (KV heads repeated for GQA) so the kernel's causal mode applies.
    Returns out [B*L, H, D] and lse [B*L, H]."""
    b, length = bucket.batch, bucket.q_len
    n_heads, d = q.shape[1], q.shape[2]
    n_kv = flat.shape[2]
    qb = q.index_select(0, bucket.q_index).view(b, length, n_heads, d).transpose(1, 2)  # [B, H, L, D]
    buf = meta.kv_buffer(2 * b * length * n_kv * d, flat.dtype, flat.device)
    kvb = torch.index_select(flat, 1, bucket.kv_index, out=buf.view(2, b * length, n_kv, d))  # [2, B*L, KVH, D]
    kvb = kvb.view(2, b, length, n_kv, d).to(q.dtype).permute(0, 1, 3, 2, 4)  # [2, B, KVH, L, D]
    if n_heads != n_kv:
        kvb = kvb.repeat_interleave(n_heads // n_kv, dim=2)  # [2, B, H, L, D]
    out, lse = _attend(qb, kvb[0], kvb[1], None, scale, causal=True)  # [B, H, L, D], [B, H, L]
    return out.transpose(1, 2).reshape(b * length, n_heads, d), lse.transpose(1, 2).reshape(b * length, n_heads)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched attention returning (out [B, h, L, D] in q's dtype, natural-log lse [B, h, L] in fp32). `causal`:
    query i sees keys 0..i (square problems only)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out, lse
    return _attend_math(q, k, v, mask, scale, causal)


def _attend_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in fp32 on any device: (out [B, h, L, D] in q's dtype, lse [B, h, L] fp32)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, h, L, Lk]
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, dim=-1)  # [B, h, L]
    p = torch.exp(s - lse.unsqueeze(-1))  # [B, h, L, Lk]
    out = torch.matmul(p, v.float())  # [B, h, L, D]
    return out.to(q.dtype), lse


def _merge(
    outs: list[torch.Tensor], lses: list[torch.Tensor], meta: AttentionMetadata, q: torch.Tensor
) -> torch.Tensor:
    """Log-sum-exp merge of the partial results into [T, H, D] (in fp32, returned in q's dtype).

    Gathers each row's L partial results into a dense [T, L, ...] block (no scatter-add): the weights are a
    softmax over the L log-sum-exps, so out = sum_l softmax(lse)_l * o_l."""
    num_tokens, n_heads, d = q.shape
    if not outs:
        return torch.zeros_like(q)
    if meta.single_cover:
        result = torch.empty((num_tokens, n_heads, d), dtype=q.dtype, device=q.device)
        return result.index_copy_(0, meta.merge_rows, torch.cat(outs).to(q.dtype))
    outs.append(torch.zeros((1, n_heads, d), dtype=outs[0].dtype, device=q.device))
    lses.append(torch.full((1, n_heads), float("-inf"), dtype=torch.float32, device=q.device))
    index = meta.merge_index  # [T, L]
    out = torch.cat(outs)[index]  # [T, L, H, D]
    weight = torch.softmax(torch.cat(lses)[index], dim=1)  # [T, L, H]
    return (out.float() * weight.unsqueeze(-1)).sum(dim=1).to(q.dtype)  # [T, H, D]
