"""Context parallelism for Hugging Face models: one sequence sharded along S over the ranks of a process group.

``with drope.hf.context_parallel(model, group) as cp:`` switches every attention layer of ``model`` to the
``"drope_cp"`` implementation (registered with transformers' ``AttentionInterface``) and back on exit. Inside it the
model's forward takes this rank's rows of the sequence (:meth:`ContextParallel.shard_batch` cuts a batch): every
part of a decoder layer but attention is per token, so it runs on the local rows unchanged, and attention is
:func:`drope.distributed.attention` (one K/V all-gather per layer; backward: one all-gather + one reduce-scatter),
with the layer's window, chunk, sinks, soft-cap and a DroPE layer's query norm and temperature rows fused.

Per forward (a hook on the backbone): one small signature all-gather (ranks that disagree raise on every rank) and,
for a prefill, one all-gather of the position ids: the global positions, checked (one sequence per row, each rank's
rows where the layout puts them) and used for the DroPE temperature, computed once on the global positions and
cut to the local rows (mode ``"length"`` needs the whole sequence's length).

Generation (:mod:`drope.hf.sharded_decode`): the prompt's K/V stay where the prefill left them (each rank's cache
holds its own rows); every new token is computed on every rank (the same q everywhere) and attends with
:func:`drope.distributed.decode_attention`, its K/V counted on the last rank only. docs/context_parallel.md explains
the choices (why the head-tail prompt needs no reordering, what each layer moves).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed as dd
from ..distributed.collectives import exchange, register_signature, signature
from ..distributed.layout import LAYOUTS, Group, check_layout, resolve_group, split_size
from ..kernels.interface import autocast_inputs
from ..kernels.cpu.prologue import rms_norm
from .attention import _layer_pattern
from .masks import OTHERS, PerForward

__all__ = ["CP_IMPLEMENTATION", "ContextParallel", "context_parallel", "cp_attention_forward", "register"]

CP_IMPLEMENTATION = "drope_cp"
IGNORE = -100
_ROWS = PerForward()
register_signature("drope.hf.context_parallel", ["batch", "rows of input_ids", "decode", "cache length", "layout",
                                                 "position_ids.shape[0]", "inputs_embeds"])


class _Step(NamedTuple):
    """What every attention layer of one forward needs: the group, the layout, and for a decode step how many of this
    rank's cache slots are live (None: all of them, the last rank, which holds the new tokens)."""

    group: object
    layout: str
    decode: bool
    live: Optional[int] = None


def cp_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                         dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                         softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                         s_aux: Optional[Tensor] = None, drope_q_norm_weight: Optional[Tensor] = None,
                         drope_norm_eps: float = 1e-6, drope_row_scale: Optional[Tensor] = None,
                         drope_cp: Optional[_Step] = None, **kwargs):
    """Attention function of ``"drope_cp"``: this rank's rows of the layer's causal attention over the whole sequence.

    A prefill (queries = this rank's rows, keys the same rows) runs :func:`drope.distributed.attention`; a decode step
    (the same new queries on every rank, keys the rank's cache) runs :func:`drope.distributed.decode_attention`.
    Arguments as ``"drope_triton"`` takes them; ``drope_cp`` is what :func:`context_parallel`'s hook passes.

    Returns:
        ``(out, None)``, out (B, Sq, Hq, D) in the query's dtype.

    Raises:
        ValueError: called outside :func:`context_parallel`; attention dropout in training; non-causal attention;
            a decode step with a window or chunk on a head-tail prompt (use ``layout="contiguous"``).
    """
    if drope_cp is None:
        raise ValueError(f"attn_implementation {CP_IMPLEMENTATION!r} runs only inside drope.hf.context_parallel(model, "
                         f"group); outside it use 'drope_triton' or {OTHERS}")
    if dropout and module.training:
        raise ValueError(f"{CP_IMPLEMENTATION} has no attention dropout; set config.attention_dropout=0 (got "
                         f"{dropout})")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError(f"{CP_IMPLEMENTATION} supports causal attention only (the module has is_causal=False)")
    query, key, value = autocast_inputs(query, key, value)
    B, HQ, SQ, D = query.shape
    SK = key.shape[2]
    window, chunk = _layer_pattern(module, sliding_window)
    scale = float(D ** -0.5 if scaling is None else scaling)
    if drope_row_scale is not None:
        base = scale
        scale = _ROWS.get(drope_row_scale, base, lambda: (drope_row_scale.float() * base).view(B, -1, SQ))
    opts = dict(group=drope_cp.group, softmax_scale=scale, window=window, chunk=chunk, sinks=s_aux,
                softcap=None if softcap is None else float(softcap), check_ranks=False)
    if not drope_cp.decode:
        if SQ != SK:
            raise ValueError(f"{CP_IMPLEMENTATION}: a context-parallel prefill has as many keys as queries (this "
                             f"rank's rows); got {SQ} queries and {SK} keys")
        out = dd.attention(query, key, value, layout=drope_cp.layout, q_norm_weight=drope_q_norm_weight,
                           norm_eps=float(drope_norm_eps), **opts)
    else:
        if drope_cp.layout == "headtail" and (window is not None or chunk is not None):
            raise ValueError(f"layout: decoding a layer with a sliding window or chunks needs the prompt's positions "
                             f"in rank order; prefill with layout='contiguous' (window={window}, chunk={chunk})")
        if drope_q_norm_weight is not None:
            query = rms_norm(query.float(), drope_q_norm_weight.float(), float(drope_norm_eps)).to(query.dtype)
        live = SK if drope_cp.live is None else drope_cp.live
        lens = torch.full((B,), live, dtype=torch.int32, device=query.device)
        out = dd.decode_attention(query, key, value, cache_seqlens=lens, **opts)
    return out.transpose(1, 2).contiguous(), None


def cp_mask(*args, **kwargs) -> None:
    """Mask function of ``"drope_cp"``: none (the causal rule over global positions lives in the attention call)."""
    return None


def register() -> None:
    """Register ``"drope_cp"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CP_IMPLEMENTATION, cp_attention_forward)
    AttentionMaskInterface.register(CP_IMPLEMENTATION, cp_mask)


def _forward_parameters(cls) -> List[str]:
    """The backbone's forward parameters after ``self`` (the first class in the MRO whose forward names input_ids:
    DroPE backbones put a ``*args, **kwargs`` forward in front of the family's)."""
    for klass in cls.__mro__:
        fn = klass.__dict__.get("forward")
        if fn is not None:
            names = list(inspect.signature(fn).parameters)[1:]
            if "input_ids" in names:
                return names
    return []


def _cache_of(kwargs: dict):
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class ContextParallel:
    """What :func:`context_parallel` yields: the model's group and layout, and the helpers of a training step.

    Attributes:
        model: the model whose attention runs across the ranks.
        group: the process group (None: the default group); ``world`` its size W, ``rank`` this rank r.
        layout: ``"headtail"`` or ``"contiguous"`` (:mod:`drope.distributed.layout`).
    """

    def __init__(self, model, group, layout: str):
        self.model, self.group, self.layout = model, group, layout
        g = resolve_group(group)
        self.world, self.rank = g.size, g.rank
        self._g: Group = g
        self._params = _forward_parameters(type(model.base_model))
        self._drope = hasattr(model.config, "drope_temperature")
        from .modeling import cache_argument

        self._cache_name = cache_argument(model)

    def shard_batch(self, batch: dict, *, num_items_in_batch=None) -> dict:
        """This rank's part of a batch of whole sequences (the same batch on every rank), ready for ``model(**local)``.

        ``input_ids`` (B, S) become this rank's rows with ``position_ids`` their global positions (the batch's own, cut
        the same way, or ``dd.positions``). Labels are shifted *globally* first (the target of a chunk's last row is
        the first token of the next chunk, which lives elsewhere under the head-tail layout): the model gets this
        rank's ``shift_labels`` (it then does not shift) and ``num_items_in_batch``, the global number of targets, so
        ``outputs.loss`` is this rank's share: the sum of its tokens' losses over the global count. The shares add up
        to the one-process mean loss (:meth:`reduce_loss`), their gradients to its gradient
        (:meth:`all_reduce_gradients`).

        Args:
            batch: ``input_ids`` (B, S); optional ``labels`` (B, S, unshifted, -100 ignored) or ``shift_labels``,
                ``position_ids`` (B or 1, S), an ``attention_mask`` of ones; other entries are passed on as they are.
            num_items_in_batch: the count to divide by (e.g. over all micro-batches of an accumulated step); None:
                the batch's own targets.

        Raises:
            ValueError: no ``input_ids``; S the layout cannot split (naming ``input_ids``); padding in
                ``attention_mask``; packed documents (``cu_seq_lens_q``); labels of another shape.
        """
        if "input_ids" not in batch:
            raise ValueError(f"batch: shard_batch needs input_ids (B, S), got keys {sorted(batch)}")
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, S) tensor, got {getattr(ids, 'shape', type(ids).__name__)}")
        B, S = ids.shape
        split_size(S, self.world, self.layout, name="input_ids")
        if batch.get("cu_seq_lens_q") is not None:
            raise ValueError("batch: packed documents (cu_seq_lens_q) are not supported under context parallelism")
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("attention_mask: padding is not supported under context parallelism (every row is one "
                             "whole sequence); pass rows of equal length without padding")
        cut = dict(group=self.group, layout=self.layout, dim=1)
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "shift_labels", "position_ids",
                                                           "attention_mask", "num_items_in_batch")}
        out["input_ids"] = dd.shard(ids, **cut)
        pos = batch.get("position_ids")
        if pos is None:
            pos = dd.positions(S, group=self.group, layout=self.layout, device=ids.device)[None].expand(B, -1)
        else:
            pos = dd.shard(pos, **cut)
        out["position_ids"] = pos
        shift = batch.get("shift_labels")
        labels = batch.get("labels")
        if shift is None and labels is not None:
            if tuple(labels.shape) != (B, S):
                raise ValueError(f"labels must have input_ids' shape {(B, S)}, got {tuple(labels.shape)}")
            shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
        if shift is not None:
            local = dd.shard(shift, **cut)
            count = shift.ne(IGNORE).sum() if num_items_in_batch is None else num_items_in_batch
            out.update(labels=local, shift_labels=local, num_items_in_batch=count)
        return out

    def reduce_loss(self, loss: Tensor) -> Tensor:
        """The global loss from this rank's share (:meth:`shard_batch`): their sum over the ranks, detached."""
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total

    def all_reduce_gradients(self, model=None) -> None:
        """Sum every parameter's gradient over the ranks (this rank's share -> the full gradient): one all-reduce per
        dtype and device (the gradients flattened into one buffer)."""
        buckets = {}
        for p in (model or self.model).parameters():
            if p.grad is not None:
                buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _before(self, module, args, kwargs):
        """Forward pre-hook on the backbone: check the ranks agree, complete and check the positions, add the
        temperature of the global positions and what the attention layers need (``drope_cp``)."""
        kwargs = dict(kwargs)
        kwargs.update(zip(self._params, args))
        x = kwargs.get("input_ids")
        embeds = x is None
        x = kwargs.get("inputs_embeds") if embeds else x
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        pos = kwargs.get("position_ids")
        error = None
        try:
            B, S_local = self._check(x, kwargs, cache, past, pos)
        except ValueError as e:
            error, (B, S_local) = e, (None, None)
        sig = signature("drope.hf.context_parallel", [B, S_local, past > 0, past, LAYOUTS.index(self.layout),
                                                      pos.shape[0] if isinstance(pos, Tensor) else None, embeds])
        exchange(self._g, sig, device=getattr(x, "device", None), local_error=error)
        kwargs["attention_mask"] = None
        if past > 0:
            prompt_local, prompt_total = cache.drope_cp_prompt
            if pos is None:
                pos = (torch.arange(S_local, device=x.device) + prompt_total + past - prompt_local)[None].expand(B, -1)
            live = None if self.rank == self.world - 1 else prompt_local
            kwargs.update(position_ids=pos, drope_cp=_Step(self.group, self.layout, True, live))
            return (), kwargs
        S = S_local * self.world
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache or (use_cache is None and getattr(module.config, "use_cache", False))):
            from transformers import DynamicCache

            # full layers only: a sliding-window layer's cache would drop this rank's keys by local count
            kwargs[self._cache_name] = DynamicCache()
        if pos is None:
            pos = dd.positions(S, group=self.group, layout=self.layout, device=x.device)[None].expand(B, -1)
        full = dd.unshard(pos, group=self.group, layout=self.layout, dim=1, check_ranks=False)
        if not torch.equal(full, full[:, :1] + torch.arange(S, device=full.device)):
            raise ValueError("position_ids: the ranks' rows do not make one sequence of consecutive positions per row; "
                             "pass each rank's global positions (dd.positions, or shard_batch), the same layout on "
                             "every rank (packed documents are not supported under context parallelism)")
        if self._drope and "drope_temperature" not in kwargs:
            kwargs["drope_temperature"] = self.temperature(full)
        kwargs.update(position_ids=pos, drope_cp=_Step(self.group, self.layout, False))
        return (), kwargs

    def temperature(self, positions: Tensor, rows: Optional[int] = None):
        """A DroPE model's per-forward temperature (``forward_temperature``) of the whole sequence at ``positions``
        (B or 1, S), cut to this rank's rows of its first ``rows`` positions (None: all of them)."""
        from .temperature import forward_temperature

        shared = forward_temperature(getattr(self.model.config, "drope_temperature", None), positions)
        if shared is None:
            return None
        first = shared[0] if rows is None else shared[0][:, :rows]
        return dd.shard(first, group=self.group, layout=self.layout, dim=1), shared[1]

    def _check(self, x, kwargs, cache, past: int, pos) -> tuple:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError("input_ids: the model needs this rank's input_ids (B, S_local) or inputs_embeds")
        B, S_local = x.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2 and bool(mask.bool().all())):
            raise ValueError("attention_mask: padding is not supported under context parallelism (every row is one "
                             "whole sequence)")
        if kwargs.get("cu_seq_lens_q") is not None:
            raise ValueError("cu_seq_lens_q: packed documents are not supported under context parallelism")
        if pos is not None and (pos.dim() != 2 or pos.shape[0] not in (1, B) or pos.shape[1] != S_local):
            raise ValueError(f"position_ids must be ({B} or 1, {S_local}): the global positions of this rank's rows, "
                             f"got {tuple(pos.shape)}")
        if any(getattr(cache, "is_sliding", ())):
            raise ValueError("cache: sliding-window cache layers keep the last keys by local count, not by position; "
                             "under context parallelism pass a DynamicCache() of full layers (or none: one is made)")
        if past > 0:
            if getattr(cache, "drope_cp_prompt", None) is None:
                raise ValueError("cache: a context-parallel decode step needs a cache filled by a prefill inside "
                                 "context_parallel (each rank holds its rows of the prompt)")
        elif self.layout == "headtail" and S_local % 2:
            raise ValueError(f"input_ids: the head-tail layout holds two equal chunks per rank; this rank has "
                             f"{S_local} rows, an odd number")
        return B, S_local

    def _after(self, module, args, kwargs, output):
        """Forward hook on the backbone: a prefill's cache remembers the prompt's rows per rank and in all."""
        cache = getattr(output, self._cache_name, None)
        step = kwargs.get("drope_cp")
        if cache is not None and step is not None and not step.decode:
            S_local = kwargs["position_ids"].shape[1]
            cache.drope_cp_prompt = (S_local, S_local * self.world)
        return output

    def decoder(self):
        """A greedy decoder whose prompt cache stays sharded over the ranks
        (:class:`drope.hf.sharded_decode.ShardedPrompt`)."""
        from .sharded_decode import ShardedPrompt

        return ShardedPrompt(self)


_ACTIVE: Dict[int, ContextParallel] = {}


@contextlib.contextmanager
def context_parallel(model, group=None, layout: str = "headtail") -> Iterator[ContextParallel]:
    """Run ``model``'s attention across the ranks of ``group``: inside the block its forward takes this rank's rows.

    Every attention layer dispatches to ``"drope_cp"`` (restored to the model's previous implementation on exit); a
    hook on the backbone checks each forward across the ranks and gives the layers the global positions' temperature.
    Logits, loss shares and gradients of the local rows equal those rows of one process on the whole sequence (after
    :meth:`ContextParallel.all_reduce_gradients` for the parameters).

    Args:
        model: a causal LM whose attention dispatches through transformers' ``AttentionInterface`` (DroPE models,
            NoPE and RoPE models: RoPE is applied by the model at the global positions it is given).
        group: the context-parallel process group (None: the default group).
        layout: ``"headtail"`` (default: balanced causal work) or ``"contiguous"`` (needed to decode layers with a
            sliding window or chunks).

    Raises:
        ValueError: no process group (``group``); an unknown ``layout``; a model already inside a
            ``context_parallel`` block.
    """
    check_layout(layout)
    cp = ContextParallel(model, group, layout)
    if id(model) in _ACTIVE:
        raise ValueError("model: already inside a context_parallel block")
    backbone = model.base_model
    previous = model.config._attn_implementation
    model.set_attn_implementation(CP_IMPLEMENTATION)
    _ACTIVE[id(model)] = cp
    handles = [backbone.register_forward_pre_hook(cp._before, with_kwargs=True),
               backbone.register_forward_hook(cp._after, with_kwargs=True)]
    try:
        yield cp
    finally:
        for h in handles:
            h.remove()
        del _ACTIVE[id(model)]
        model.set_attn_implementation(previous)
