"""Continuous batching on drope's kernels: transformers' ``generate_batch``, ``init_continuous_batching`` /
``ContinuousBatchingManager`` and ``transformers serve --continuous-batching``, without patching transformers.

The route transformers supports for an outside attention under continuous batching is a kernel repository loaded by
the ``kernels`` package, whose ``LOCAL_KERNELS`` variable maps a repository id to a local directory (the kernels
project's own way to use a kernel before publishing it; no network, no trust prompt). drope ships such a directory
(``drope/hf/kernel_repo``: ``build/torch-universal/{metadata.json,__init__.py}``). Its module exposes
:func:`flash_attn_forward` and ``supports_flash_attn``, which makes transformers' loader
(``integrations/hub_kernels.py``, ``load_and_register_attn_kernel``; 5.17 and 5.25) register that function itself as
the attention of the implementation: it receives every attention argument, the DroPE classes' query norm and
temperature rows included, so they run fused in the kernel, as under ``"drope_triton"``. The name
:data:`KERNEL_REPO` holds "flash" (continuous batching then packs each step as one varlen batch, no 4-D mask) and a
"3" (on CUDA, transformers' decode fast path: paged K/V with a block table, ``flash_attn_with_kvcache`` present).

    model.set_attn_implementation(drope.hf.continuous_batching_attention())   # the one line
    model.generate_batch(prompts, generation_config)                           # on drope's kernels

The attention reads no device value on the host (CUDA graphs capture it) and takes transformers' padded batches:
rows after the last boundary and decode rows of length 0 (block-table entries of -1) come out as zeros.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

import torch

from .. import kernels
from . import attention as hf_attention

__all__ = ["KERNEL_REPO", "REPO_ID", "continuous_batching_attention", "flash_attn_forward", "paged_attention_forward",
           "repository_exports", "supports_flash_attn"]

# the repository id the `kernels` package resolves, and the implementation name: "<repo>:<function>" (transformers
# 5.17 registers that function of the module; 5.25 its flash_attn_forward)
REPO_ID = "drope/flash-drope3"
KERNEL_REPO = REPO_ID + ":attention"
REPO_DIR = Path(__file__).resolve().parent / "kernel_repo"
# transformers' loader only checks that the kernel module has this attribute
supports_flash_attn = True


def continuous_batching_attention() -> str:
    """Make :data:`KERNEL_REPO` loadable by the ``kernels`` package (``LOCAL_KERNELS``, added to what is already
    there) and return it: the ``attn_implementation`` that runs continuous batching on drope's kernels.

    Raises:
        ImportError: the ``kernels`` package (the version range the installed transformers pins) is missing.
    """
    from transformers.utils import is_kernels_available

    if not is_kernels_available():
        raise ImportError("continuous batching on drope's kernels needs the `kernels` package (the version the "
                          "installed transformers pins): pip install 'drope[serve]' or pip install kernels")
    entry = f"{REPO_ID}={REPO_DIR}"
    current = [e for e in os.environ.get("LOCAL_KERNELS", "").split(":") if e and not e.startswith(REPO_ID + "=")]
    os.environ["LOCAL_KERNELS"] = ":".join(current + [entry])
    return KERNEL_REPO


def _codes_from_mask(mask: torch.Tensor, SK: int) -> torch.Tensor:
    """transformers' 4-D boolean mask (B, 1, Sq, Sk) (True: attend), outside continuous batching, as drope's key-slot
    codes (B, 1, 1, Sk): slots some row sees are real (0); slots before the last row's last visible key that no row
    sees are padding (-1); slots after it are past the live length (-2). Exact for padding, causal and windows (the
    kernel applies the causal and window rules itself); built on the device."""
    if mask.dim() == 2:  # a flash-style (B, tokens) padding mask (transformers 5.17's mask for the name)
        real = torch.nn.functional.pad(mask.bool(), (0, max(SK - mask.shape[1], 0)))[:, :SK]
        return torch.where(real, 0, hf_attention.PAD).to(torch.int8)[:, None, None, :]
    if mask.dtype != torch.bool:
        mask = mask == 0  # an additive float mask: 0 where attended
    seen = mask[:, 0].any(1)  # (B, Sk)
    slots = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask[:, 0, -1], slots, -1).amax(-1, keepdim=True)  # the live length - 1
    codes = torch.where(seen, 0, torch.where(slots[None, :] <= last, hf_attention.PAD, -2)).to(torch.int8)
    return codes[:, None, None, :]


def flash_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                       s_aux: Optional[torch.Tensor] = None, drope_q_norm_weight: Optional[torch.Tensor] = None,
                       drope_norm_eps: float = 1e-6, drope_row_scale: Optional[torch.Tensor] = None,
                       cu_seq_lens_q: Optional[torch.Tensor] = None, cu_seq_lens_k: Optional[torch.Tensor] = None,
                       block_table: Optional[torch.Tensor] = None, k_cache: Optional[torch.Tensor] = None,
                       v_cache: Optional[torch.Tensor] = None, **kwargs):
    """The attention of :data:`KERNEL_REPO` (transformers' ``AttentionInterface`` signature).

    Under continuous batching: q (1, Hq, total_q, D) holds every request's new rows, packed by ``cu_seq_lens_q``;
    either k, v hold each request's keys packed by ``cu_seq_lens_k`` (queries are the last rows of their keys), or, on
    the decode fast path, k, v are the new tokens and ``k_cache`` / ``v_cache`` (num_blocks, block_size, Hkv, D) the
    paged cache with ``block_table``. Outside it (``generate``, a forward) the call goes to ``"drope_triton"``'s
    function, the 4-D boolean mask turned into its key-slot codes.

    Returns:
        ``(out, None)``, out (1, total_q, Hq, D) (or (B, Sq, Hq, D) outside continuous batching).

    Raises:
        ValueError: attention dropout in training, non-causal attention, a mask of another form.
    """
    extra = dict(dropout=dropout, scaling=scaling, sliding_window=sliding_window, softcap=softcap, s_aux=s_aux,
                 drope_q_norm_weight=drope_q_norm_weight, drope_norm_eps=drope_norm_eps,
                 drope_row_scale=drope_row_scale)
    if cu_seq_lens_q is None:
        if attention_mask is not None and not (attention_mask.dim() == 4 and attention_mask.dtype in (torch.int8,
                                                                                                      torch.int32)):
            attention_mask = _codes_from_mask(attention_mask, key.shape[2])
        return hf_attention.drope_attention_forward(module, query, key, value, attention_mask, **extra, **kwargs)
    if dropout and module.training:
        raise ValueError(f"{KERNEL_REPO} has no attention dropout; set config.attention_dropout=0 (got {dropout})")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError(f"{KERNEL_REPO} supports causal attention only (the module is not causal)")
    query, key, value = hf_attention._autocast(query, key, value)
    _, HQ, T, D = query.shape
    window, chunk = hf_attention._layer_pattern(module, sliding_window)
    base = float(D ** -0.5 if scaling is None else scaling)
    scale = base if drope_row_scale is None else (drope_row_scale.to(torch.float32) * base).view(1, -1, T)
    kw = dict(softmax_scale=scale, window=window, chunk=chunk, sinks=s_aux,
              softcap=None if softcap is None else float(softcap), check_values=False)
    if block_table is not None and k_cache is not None:
        # decode fast path: one new row per request, appended to the paged cache and attended in one call
        lens = (cu_seq_lens_k[1:T + 1] - cu_seq_lens_k[:T]).to(torch.int32)
        q = query[0].transpose(0, 1)[:, :, None]  # (B, Hq, 1, D)
        if drope_q_norm_weight is not None:
            q = kernels.qk_norm_rope(q, drope_q_norm_weight, eps=float(drope_norm_eps))
        if isinstance(scale, torch.Tensor):
            kw["softmax_scale"] = scale[0].transpose(0, 1)[:, :, None]  # (B, 1 or Hq, 1)
        with torch.no_grad():
            out = kernels.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=block_table,
                                           k_new=key[0].transpose(0, 1)[:, :, None],
                                           v_new=value[0].transpose(0, 1)[:, :, None], **kw)
        return out[:, :, 0][None], None
    out = kernels.attention(query, key, value, causal=True, cu_seqlens_q=cu_seq_lens_q.to(torch.int32),
                            cu_seqlens_k=cu_seq_lens_k.to(torch.int32), q_norm_weight=drope_q_norm_weight,
                            norm_eps=float(drope_norm_eps), **kw)
    return out.transpose(1, 2), None


def flash_attn_with_kvcache(*args, **kwargs):
    """flash-attn's ``flash_attn_with_kvcache`` (:mod:`drope.flash_attn`, ``s_aux`` sinks included), present so that
    transformers enables its CUDA decode fast path; 5.17's paged wrapper calls it (5.25 hands those steps to
    :func:`flash_attn_forward`)."""
    from ..flash_attn import flash_attn_with_kvcache as fn

    return fn(*args, **kwargs)


def paged_era() -> bool:
    """Whether the installed transformers runs continuous batching through its paged wrapper (5.17: the
    implementation ``paged|<name>``, the paged cache updated by the attention function,
    ``integrations/flash_paged.py``); 5.2x updates the cache in the model and calls :func:`flash_attn_forward`."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:
        return False
    return "kwargs" not in inspect.signature(PagedAttentionCache.update).parameters


def repository_exports() -> dict:
    """What the kernel repository's module exposes for the installed transformers (its ``__init__`` takes these).

    Never ``flash_attn_varlen_func``: with it transformers would register its own flash wrapper, which drops the
    fused arguments (5.25) and the window of models whose attention modules carry none (5.17). 5.25 registers
    ``flash_attn_forward`` (``supports_flash_attn`` present); 5.17, which calls the implementation ``paged|<name>``
    and would wrap ``flash_attn_forward`` in its own paged wrapper, registers the function the name's ``:attention``
    designates: :func:`paged_attention_forward`, which updates the paged cache itself.
    """
    names = {"flash_attn_forward": flash_attn_forward, "flash_attn_with_kvcache": flash_attn_with_kvcache}
    if paged_era():
        names["attention"] = paged_attention_forward
    else:
        names.update(attention=flash_attn_forward, supports_flash_attn=supports_flash_attn)
    return names


def paged_attention_forward(module, query, key, value, attention_mask, cache=None, cu_seq_lens_q=None,
                            cu_seq_lens_k=None, max_seqlen_q=None, max_seqlen_k=None, block_table=None, **kwargs):
    """What transformers 5.17's paged wrapper does (update the paged cache, then attend), with drope's kernels and the
    DroPE classes' query norm and temperature fused; outside continuous batching, :func:`flash_attn_forward`. The
    layer's window is read from the model (5.17's wrapper reads an attribute Mistral's modules do not have)."""
    if cache is None or cu_seq_lens_q is None:
        return flash_attn_forward(module, query, key, value, attention_mask, cu_seq_lens_q=cu_seq_lens_q,
                                  cu_seq_lens_k=cu_seq_lens_k, block_table=block_table, **kwargs)
    window, _ = hf_attention._layer_pattern(module, kwargs.get("sliding_window"))
    layer_type = "sliding_attention" if window else "full_attention"
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k = cu_seq_lens_k[layer_type]
    if block_table is None:
        k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=kwargs.pop("read_index"), write_index=kwargs.pop("write_index"))
        return flash_attn_forward(module, query, k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                                  cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, **kwargs)
    group, index = cache.layer_index_to_group_indices[module.layer_idx]
    shape = (-1, cache.block_size, cache.num_key_value_heads, cache.head_dim)
    return flash_attn_forward(module, query, key, value, None, cu_seq_lens_q=cu_seq_lens_q,
                              cu_seq_lens_k=cu_seq_lens_k, block_table=block_table[group],
                              k_cache=cache.key_cache[index].view(shape), v_cache=cache.value_cache[index].view(shape),
                              **kwargs)
