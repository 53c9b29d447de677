"""``drope::attention_fwd`` / ``drope::attention_bwd`` on CPU tensors: exact PyTorch kernels of the same contract.

The core is PyTorch's own CPU flash-attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``, what
``scaled_dot_product_attention`` runs on a CPU: O(S) memory, GQA without repeating K/V, the log-sum-exp returned)
and its backward, which recomputes the probabilities from a given output and LSE. Everything drope adds is built
around it:

- the QK prologue (norm, RoPE) runs first (:mod:`.prologue`); per-row / per-head scales multiply the queries
  (fp32 then, so the logits round as the kernels' fp32 multiply does);
- bottom-right causal with Sq < Sk is two calls (the keys every row sees, then a square causal block) merged by
  their LSEs; windows, chunks and key masks run in blocks of :data:`BLOCK` query rows against the band of keys
  they can see, with an additive mask of that block only (memory O(BLOCK x band));
- packed documents (``cu_seqlens``, ``cu_seqlens_k``, a paged ``block_table``) run document by document;
- sinks rescale the result: ``L = logaddexp(lse, sink)``, ``o *= exp(lse - L)``;
- soft-capping has no flash form: its blocks compute the logits explicitly (fp32, a bounded block of them).

The backward decomposes over the same blocks: the flash backward of each (rows, band) pair, given the *final*
output and LSE, is that pair's exact share of dq, dk, dv (``d lse`` enters through one extra zero column of
q, k, v whose output column carries ``-d lse``). Rows with no visible key have LSE -inf and output zeros.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

from .prologue import compute_dtype, qk_hat, qk_hat_backward

__all__ = ["BLOCK", "attention_backward", "attention_forward", "plan"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# query rows per masked block (windows, chunks, key masks)
BLOCK = 512
# logits per explicit soft-cap block (fp32): 64 MB
_SOFTCAP_ELEMS = 1 << 24
# fp32 elements of one chunk of query heads' q and out together in the backward (4 MB; dout and dq alike)
_BWD_CHUNK_ELEMS = 1 << 20


def plan(SQ: int, SK: int, p0: int, causal: bool, window: Optional[int], chunk: Optional[int],
         masked: bool) -> Iterator[Tuple[int, int, int, int, bool, bool]]:
    """The (row start, row end, key start, key end, causal flag, needs mask) pieces of one attention problem.

    Row i sits at position ``p0 + i``; keys at 0..SK-1. Pieces of the same rows are merged by LSE in the forward
    and summed in the backward. ``needs mask``: the piece's visibility is not its causal flag alone.
    """
    if SQ == 0:
        return
    if not causal:
        yield 0, SQ, 0, SK, False, masked
        return
    last = p0 + SQ - 1
    if window is not None and window > last:
        window = None  # every visible key is inside the window
    if chunk is not None and last < chunk:
        chunk = None  # one chunk, starting at 0
    if window is None and chunk is None and not masked and p0 >= 0:
        if SQ == 1:  # one row (a decode step) sees every key up to its position: one unmasked call
            yield 0, 1, 0, min(p0 + 1, SK), False, False
            return
        if p0:
            yield 0, SQ, 0, min(p0, SK), False, False  # the keys before the first row: seen by every row
        yield 0, SQ, p0, SK, True, False
        return
    a = 0
    while a < SQ:
        p, e, lo = p0 + a, min(SQ, a + BLOCK), 0
        if chunk is not None:
            start = (max(p, 0) // chunk) * chunk
            e, lo = min(e, start + chunk - p0), start
        if window is not None:
            lo = max(lo, p - window + 1)
        # a single row sees every key of its band (the band is its window and chunk): a mask only for key masks
        yield a, e, max(lo, 0), max(min(SK, p0 + e), 0), False, masked or e - a > 1
        a = e


def _visible(a: int, e: int, lo: int, hi: int, p0: int, causal: bool, window, chunk, device) -> torch.Tensor:
    """(e - a, hi - lo) bool: whether key lo + j is visible to row a + i (row i at position p0 + i)."""
    rows = torch.arange(p0 + a, p0 + e, device=device)[:, None]
    keys = torch.arange(lo, hi, device=device)[None, :]
    if not causal:
        return torch.ones(e - a, hi - lo, dtype=torch.bool, device=device)
    back = rows - keys  # how far behind the row's position the key is
    ok = (back >= 0) & ((back < window) if window is not None else True)
    if chunk is not None:
        ok = ok & (rows.div(chunk, rounding_mode="floor") == keys.div(chunk, rounding_mode="floor"))
    return ok


def _piece_mask(piece, p0, causal, window, chunk, keys, dtype, device):
    """(additive float mask (B|1, 1, rows, keys) or None, bool rows-with-a-key (B|1, 1, rows) or None)."""
    a, e, lo, hi, _, masked = piece
    if not masked:
        return None, None
    if e - a == 1 and keys is not None:  # one row sees its whole band (its window and chunk): the key mask alone
        vis = keys[:, None, None, lo:hi]
    else:
        vis = _visible(a, e, lo, hi, p0, causal, window, chunk, device)[None, None]
        if keys is not None:
            vis = vis & keys[:, None, None, lo:hi]
    add = torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))
    return add, vis.any(-1)


def _merge(o1, l1, o2, l2):
    """Two partial results of the same rows over disjoint keys, by LSE (fp32; -inf rows contribute nothing)."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    den = w1 + w2
    o = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / torch.where(den > 0, den, 1.0)[..., None]
    return o.to(o1.dtype), torch.where(den > 0, m + torch.log(den), float("-inf"))


def _core(q, k, v, *, p0, causal, window, chunk, keys, scale):
    """(out, lse) of prepared q (B, Hq, Sq, D) against k, v (B, Hkv, Sk, D), logits ``q.k * scale``."""
    B, HQ, SQ, D = q.shape
    pieces = [p for p in plan(SQ, k.shape[2], p0, causal, window, chunk, keys is not None) if p[3] > p[2]]
    if len(pieces) == 1 and pieces[0][:2] == (0, SQ):
        # one call covers every row (plain causal, full attention, a decode step): its own output, no copy
        _, _, lo, hi, flag, _ = pieces[0]
        mask, has = _piece_mask(pieces[0], p0, causal, window, chunk, keys, q.dtype, q.device)
        o, l = _FLASH(q, k[:, :, lo:hi], v[:, :, lo:hi], 0.0, flag, attn_mask=mask, scale=scale)
        return (o, l) if has is None else (o, torch.where(has, l, float("-inf")))
    out = q.new_zeros(B, HQ, SQ, v.shape[-1])
    lse = torch.full((B, HQ, SQ), float("-inf"), dtype=torch.float32)
    done = None
    for piece in pieces:
        a, e, lo, hi, flag, _ = piece
        mask, has = _piece_mask(piece, p0, causal, window, chunk, keys, q.dtype, q.device)
        o, l = _FLASH(q[:, :, a:e], k[:, :, lo:hi], v[:, :, lo:hi], 0.0, flag, attn_mask=mask, scale=scale)
        if has is not None:
            l = torch.where(has, l, float("-inf"))
        if done == (a, e):  # a second piece of the same rows (bottom-right causal): merge by LSE
            o, l = _merge(out[:, :, a:e], lse[:, :, a:e], o, l)
        out[:, :, a:e], lse[:, :, a:e], done = o, l, (a, e)
    return out, lse


def _softcapped(q, k, v, *, p0, causal, window, chunk, keys, scale, softcap, visible=None, grad=None):
    """(out, lse) with logits ``softcap * tanh(q.k * scale / softcap)``, explicit in fp32 blocks of rows.

    ``visible`` (B, Sq, Sk) replaces the positional visibility. With ``grad = (dout, out, lse, dlse)`` (the final
    output and LSE, sinks included; ``dlse`` or None) it returns fp32 (dq, dk, dv) instead, by the flash backward's
    formulas on the explicit logits: ``p = exp(s - lse)``, ``ds = p (dp - delta)``, ``delta = dO . O - dlse``,
    through the soft-cap's derivative ``1 - tanh^2``.
    """
    B, HQ, SQ, D = q.shape
    HKV, SK, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    step = max(1, _SOFTCAP_ELEMS // max(1, B * HQ * SK))
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # (B, Hkv, 1, Sk, D): the G heads of a group share them
    outs, lses = [], []
    if grad is not None:
        dout, o_all, l_all, dlse = grad
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v))
    for a in range(0, SQ, step):
        e = min(SQ, a + step)
        n = e - a
        qb = q[:, :, a:e].float().view(B, HKV, G, n, D)
        sc = scale if not isinstance(scale, torch.Tensor) else scale[:, :, a:e].view(B, HKV, G, n, 1)
        t = torch.tanh(torch.matmul(qb, kf.transpose(-1, -2)) * sc / softcap)  # (B, Hkv, G, n, Sk)
        if visible is not None:
            vis = visible[:, None, None, a:e]
        else:
            vis = _visible(a, e, 0, SK, p0, causal, window, chunk, q.device)[None, None, None]
        if keys is not None:
            vis = vis & keys[:, None, None, None, :]
        s = (softcap * t).masked_fill(~vis, float("-inf"))
        if grad is None:
            has = vis.any(-1)
            lb = torch.logsumexp(s, -1)
            p = torch.exp(s - torch.where(has, lb, 0.0)[..., None])
            outs.append(torch.matmul(p, vf).view(B, HQ, n, DV).to(q.dtype))
            lses.append(torch.where(has, lb, float("-inf")).view(B, HQ, n))
            continue
        lb = l_all[:, :, a:e].view(B, HKV, G, n)
        p = torch.exp(s - torch.where(torch.isfinite(lb), lb, float("inf"))[..., None])
        do = dout[:, :, a:e].float().view(B, HKV, G, n, DV)
        delta = (do * o_all[:, :, a:e].float().view(B, HKV, G, n, DV)).sum(-1)
        if dlse is not None:
            delta = delta - dlse[:, :, a:e].float().view(B, HKV, G, n)
        ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta[..., None]) * (1 - t * t) * sc
        dq[:, :, a:e] += torch.matmul(ds, kf).view(B, HQ, n, D)
        dk += torch.matmul(ds.transpose(-1, -2), qb).sum(2)
        dv += torch.matmul(p.transpose(-1, -2), do).sum(2)
    if grad is not None:
        return dq, dk, dv
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _sinked(out, lse, sinks):
    """The sink logit of each head joins the denominator: ``L = logaddexp(lse, sink)``, ``o *= exp(lse - L)``."""
    s = sinks.float()[None, :, None]
    total = torch.logaddexp(lse, s)
    f = torch.where(torch.isneginf(lse), torch.zeros_like(lse), torch.exp(lse - total))
    return (out.float() * f[..., None]).to(out.dtype), total


def _documents(SQ, SK, cu_q, cu_k) -> List[Tuple[int, int, int, int, int]]:
    """(document, row start, row end, key start, key end) of every document with queries (the whole problem when
    not packed)."""
    if cu_q is None:
        return [(0, 0, SQ, 0, SK)]
    c = cu_q.tolist()
    ck = c if cu_k is None else cu_k.tolist()
    return [(d, a, b, ka, kb) for d, (a, b, ka, kb) in enumerate(zip(c[:-1], c[1:], ck[:-1], ck[1:])) if b > a]


def _single_rows(qs, kh, v, docs, causal, window, chunk, keys, scale):
    """(out (1, Hq, n, D), lse (1, Hq, n)) of the n documents of ``docs`` that hold one query row each (the decode
    rows of a continuous-batching step), in one call: each row against its band of keys (every key of the band
    visible: a lone row's window and chunk are its band), gathered into a (n, Hkv, M, D) batch and masked by length."""
    dev = qs.device
    table = torch.tensor(docs, device=dev)  # (n, 5): document, row start, row end, key start, key end
    rows, ka, L = table[:, 1], table[:, 3], table[:, 4] - table[:, 3]
    lo = torch.zeros_like(L)
    if causal and chunk is not None:
        lo = torch.div(L - 1, chunk, rounding_mode="floor") * chunk
    if causal and window is not None:
        lo = torch.maximum(lo, L - window)
    lo = lo.clamp(min=0)
    n_keys = (L - lo).clamp(min=0)  # a row with no key (Sq > Sk): nothing visible, zeros
    n, M = len(docs), max(int(n_keys.max()), 1)
    j = torch.arange(M, device=dev)[None, :]
    valid = j < n_keys[:, None]  # (n, M)
    idx = torch.where(valid, ka[:, None] + lo[:, None] + j, 0).flatten()
    if keys is not None:
        valid = valid & keys[0].index_select(0, idx).view(n, M)
    # index_select, not advanced indexing: several times faster on CPU tensors
    kd = kh[0].index_select(1, idx).view(kh.shape[1], n, M, -1).transpose(0, 1)  # (n, Hkv, M, D)
    vd = v[0].index_select(1, idx).view(v.shape[1], n, M, -1).transpose(0, 1)
    qd = qs[0].index_select(1, rows).transpose(0, 1)[:, :, None]  # (n, Hq, 1, D)
    mask = torch.zeros(valid.shape, dtype=qd.dtype, device=dev).masked_fill_(~valid, float("-inf"))
    o, l = _FLASH(qd, kd.to(qd.dtype), vd.to(qd.dtype), 0.0, False, attn_mask=mask[:, None, None], scale=scale)
    l = torch.where(valid.any(-1)[:, None, None], l, float("-inf"))
    return o[:, :, 0].transpose(0, 1)[None], l[:, :, 0].transpose(0, 1)[None], rows


def _paged_keys(cache: torch.Tensor, block_table: torch.Tensor, d: int, n: int) -> torch.Tensor:
    """(1, Hkv, n, D) keys (or values) 0..n-1 of document d's pages; pages outside the pool or past its table row
    raise (on the CPU every value is at hand: a bad table is an error, never a plausible number)."""
    page = cache.shape[1]
    need = -(-n // page)
    if need > block_table.shape[1]:
        raise ValueError(f"cu_seqlens_k: document {d} has {n} keys, more than its block_table row holds "
                         f"(max_pages x page_size = {block_table.shape[1] * page})")
    idx = block_table[d, :need].long()
    if need and (int(idx.min()) < 0 or int(idx.max()) >= cache.shape[0]):
        raise ValueError(f"block_table row {d} holds a page index outside [0, {cache.shape[0]})")
    return cache[idx].reshape(need * page, *cache.shape[2:])[:n].transpose(0, 1)[None]


def _rope_positions(q, rope_cos, cu_q) -> Optional[torch.Tensor]:
    """Each row's RoPE position when documents are packed together (restarting at 0 in each), else None."""
    if rope_cos is None or cu_q is None:
        return None
    c = cu_q.long()
    lengths = c[1:] - c[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=q.shape[2])
    return torch.arange(q.shape[2]) - c[:-1][doc]


def _prepared(q, k, q_norm_weight, k_norm_weight, rope_cos, rope_sin, cu_q, cu_k, norm_eps, SK):
    """q_hat, k_hat (the prologue), with RoPE positions restarting per document when packed together."""
    pos = _rope_positions(q, rope_cos, cu_q)
    qh = qk_hat(q, q_norm_weight, rope_cos, rope_sin, pos, SK - q.shape[2], norm_eps)
    kh = qk_hat(k, k_norm_weight, rope_cos, rope_sin, pos, 0, norm_eps)
    return qh, kh


def _scaled(qh, scale_rows, scale):
    """(queries, logit scale): per-row / per-head multipliers folded into fp32 queries; else the constant."""
    if scale_rows is None:
        return qh, scale
    return qh.to(compute_dtype(qh.dtype)) * (scale_rows * scale)[..., None].to(compute_dtype(qh.dtype)), 1.0


def attention_forward(q, k, v, q_norm_weight, k_norm_weight, sinks, scale_rows, rope_cos, rope_sin, cu_seqlens_q,
                      cu_seqlens_k, key_mask, block_table, causal, scale, norm_eps, window, chunk, softcap,
                      return_lse):
    """``drope::attention_fwd`` on CPU tensors: (out in q's dtype and layout, lse fp32 (B, Hq, Sq) or (0,))."""
    SQ = q.shape[2]
    SK = int(cu_seqlens_k[-1]) if block_table is not None else k.shape[2]
    with torch.no_grad():
        qh, kh = _prepared(q, k, q_norm_weight, k_norm_weight, rope_cos, rope_sin, cu_seqlens_q, cu_seqlens_k,
                           norm_eps, k.shape[2] if block_table is None else SK)
        qs, sc = _scaled(qh, None if softcap is not None else scale_rows, scale)
        keys = None if key_mask is None else key_mask != 0
        docs = _documents(SQ, SK, cu_seqlens_q, cu_seqlens_k)
        if len(docs) == 1 and docs[0][1:] == (0, SQ, 0, SK) and block_table is None and softcap is None:
            # one problem: the kernel's output is the result (no copy into a second buffer)
            out, lse = _core(qs, kh.to(qs.dtype), v.to(qs.dtype), p0=SK - SQ, causal=causal, window=window,
                             chunk=chunk, keys=keys, scale=sc)
            out = out.to(q.dtype)
            if sinks is not None:
                out, lse = _sinked(out, lse, sinks)
            return out, (lse if return_lse else lse.new_empty((0,)))
        out = torch.zeros_like(q)  # rows after the last boundary (a padded batch) see nothing: zeros
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32)
        singles = [d for d in docs if d[2] - d[1] == 1]
        if block_table is None and softcap is None and q.shape[0] == 1 and len(singles) > 1:
            # the one-row documents (decode rows of a continuous-batching step) in one call
            o, l, rows = _single_rows(qs, kh, v, singles, causal, window, chunk, keys, sc)
            out[:, :, rows], lse[:, :, rows] = o.to(q.dtype), l
            docs = [d for d in docs if d[2] - d[1] != 1]
        for d, a, b, ka, kb in docs:
            if block_table is not None:
                kd, vd = _paged_keys(kh, block_table, d, kb - ka), _paged_keys(v, block_table, d, kb - ka)
            else:
                kd, vd = kh[:, :, ka:kb], v[:, :, ka:kb]
            kw = dict(p0=(kb - ka) - (b - a), causal=causal, window=window, chunk=chunk,
                      keys=None if keys is None else keys[:, ka:kb])
            qd = qs[:, :, a:b]
            if softcap is not None:
                rows = None if scale_rows is None else (scale_rows * scale)[:, :, a:b, None]
                o, l = _softcapped(qd, kd, vd, scale=scale if rows is None else rows, softcap=softcap, **kw)
            else:
                o, l = _core(qd, kd.to(qd.dtype), vd.to(qd.dtype), scale=sc, **kw)
            out[:, :, a:b], lse[:, :, a:b] = o.to(q.dtype), l
        if sinks is not None:
            out, lse = _sinked(out, lse, sinks)
    return out, (lse if return_lse else lse.new_empty((0,)))


def _head_chunks(HQ: int, G: int, n: int) -> Iterator[Tuple[int, int, int, int]]:
    """(first, end) query heads and (first, end) KV heads of chunks of about ``n`` query heads: whole GQA groups,
    or parts of one group (its one KV head)."""
    if n >= G:
        step = n // G * G
        for h0 in range(0, HQ, step):
            h1 = min(HQ, h0 + step)
            yield h0, h1, h0 // G, h1 // G
        return
    for hk in range(HQ // G):
        for j in range(0, G, n):
            yield hk * G + j, hk * G + min(G, j + n), hk, hk + 1


def attention_backward(dout, dlse, q, k, v, out, lse, q_norm_weight, k_norm_weight, sinks, scale_rows, rope_cos,
                       rope_sin, cu_seqlens_q, cu_seqlens_k, key_mask, causal, scale, norm_eps, window, chunk, softcap,
                       needs):
    """``drope::attention_bwd`` on CPU tensors: (dq, dk, dv, d q_norm_weight, d k_norm_weight, d sinks), each None
    when not asked for (``needs``, in that order). No autograd inside (an operator's kernel runs below it).

    The flash backward runs in fp32 (16-bit operands upcast exactly: aten's 16-bit CPU backward rounds the dk / dv
    partials to the input dtype, 1 ulp where flash-attn's bound is half that, and is several times slower than its
    fp32 one on CPUs without native bf16), a chunk of query heads at a time so that the fp32 copies stay small."""
    SQ, SK = q.shape[2], k.shape[2]
    qh, kh = _prepared(q, k, q_norm_weight, k_norm_weight, rope_cos, rope_sin, cu_seqlens_q, cu_seqlens_k, norm_eps,
                       SK)
    qs, sc = _scaled(qh, None if softcap is not None else scale_rows, scale)
    f32 = compute_dtype(qs.dtype)
    dsinks = None
    if needs[5] and sinks is not None:
        delta = (dout.float() * out.float()).sum(-1) - (0 if dlse is None else dlse.float())
        p_sink = torch.exp(sinks.float()[None, :, None] - lse).nan_to_num(0.0)
        dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
    B, HQ, _, D = qs.shape
    HKV, DV = kh.shape[1], v.shape[-1]
    # nothing after dq (no row scale to apply, no norm or RoPE to undo): it goes to q's dtype a chunk at a time
    direct = (scale_rows is None or softcap is not None) and q_norm_weight is None and rope_cos is None
    dq = torch.empty(q.shape, dtype=q.dtype) if direct else torch.zeros(qs.shape, dtype=f32)
    dk, dv = (torch.zeros(t.shape, dtype=f32) for t in (kh, v))
    # rows whose LSE is not finite have all-zero probabilities: +inf keeps them zero in the flash backward
    lse_safe = torch.where(torch.isfinite(lse), lse, float("inf"))
    keys = None if key_mask is None else key_mask != 0
    docs = _documents(SQ, SK, cu_seqlens_q, cu_seqlens_k)
    for h0, h1, k0, k1 in _head_chunks(HQ, HQ // HKV, max(1, _BWD_CHUNK_ELEMS // max(1, B * SQ * (D + DV)))):
        qc, kc, vc = qs[:, h0:h1].to(f32), kh[:, k0:k1].to(f32), v[:, k0:k1].to(f32)
        do, o_all = dout[:, h0:h1].to(f32), out[:, h0:h1].to(f32)
        dl = None if dlse is None else dlse[:, h0:h1]
        if dl is not None and softcap is None:
            # one zero column in q, k, v whose output column is -d lse: delta_i = dO_i . O_i - d lse_i
            zq, zk = qc.new_zeros(*qc.shape[:3], 1), kc.new_zeros(*kc.shape[:3], 1)
            qc, kc, vc = torch.cat((qc, zq), -1), torch.cat((kc, zk), -1), torch.cat((vc, zk), -1)
            o_all = torch.cat((o_all, -dl.to(f32)[..., None]), -1)
            do = torch.cat((do, do.new_ones(*do.shape[:3], 1)), -1)
        # views: += writes the outputs
        gq_all = torch.zeros((B, h1 - h0, SQ, D), dtype=f32) if direct else dq[:, h0:h1]
        gk_all, gv_all = dk[:, k0:k1], dv[:, k0:k1]
        for _, a, b, ka, kb in docs:
            p0 = (kb - ka) - (b - a)
            kkeys = None if keys is None else keys[:, ka:kb]
            if softcap is not None:
                rows = None if scale_rows is None else (scale_rows * scale)[:, h0:h1, a:b, None]
                g = _softcapped(qc[:, :, a:b], kc[:, :, ka:kb], vc[:, :, ka:kb], p0=p0, causal=causal, window=window,
                                chunk=chunk, keys=kkeys, scale=scale if rows is None else rows, softcap=softcap,
                                grad=(do[:, :, a:b], o_all[:, :, a:b], lse[:, h0:h1, a:b],
                                      None if dl is None else dl[:, :, a:b]))
                gq_all[:, :, a:b] += g[0]
                gk_all[:, :, ka:kb] += g[1]
                gv_all[:, :, ka:kb] += g[2]
                continue
            for piece in plan(b - a, kb - ka, p0, causal, window, chunk, kkeys is not None):
                pa, pe, lo, hi, flag, _ = piece
                if hi <= lo:
                    continue
                mask, _ = _piece_mask(piece, p0, causal, window, chunk, kkeys, f32, q.device)
                r, kk = slice(a + pa, a + pe), slice(ka + lo, ka + hi)
                gq, gk, gv = _FLASH_BWD(do[:, :, r], qc[:, :, r], kc[:, :, kk], vc[:, :, kk], o_all[:, :, r],
                                        lse_safe[:, h0:h1, r], 0.0, flag, attn_mask=mask, scale=sc)
                gq_all[:, :, r] += gq[..., :D]
                gk_all[:, :, kk] += gk[..., :D]
                gv_all[:, :, kk] += gv[..., :DV]
        if direct:
            dq[:, h0:h1] = gq_all
    pos = _rope_positions(q, rope_cos, cu_seqlens_q)
    if direct:
        dq, dwq = (dq if needs[0] else None), None
    else:
        if scale_rows is not None and softcap is None:
            dq = dq * (scale_rows * scale)[..., None]
        dq, dwq = qk_hat_backward(dq, q, q_norm_weight, rope_cos, rope_sin, pos, SK - SQ, norm_eps, needs[0],
                                  needs[3] and q_norm_weight is not None)
    dk, dwk = qk_hat_backward(dk, k, k_norm_weight, rope_cos, rope_sin, pos, 0, norm_eps, needs[1],
                              needs[4] and k_norm_weight is not None)
    return dq, dk, (dv.to(v.dtype) if needs[2] else None), dwq, dwk, dsinks
