"""Greedy decoding with the prompt's KV cache sharded over the ranks of a context-parallel group.

:class:`ShardedPrompt` prefills a prompt across the ranks inside :func:`drope.hf.context_parallel` (each rank keeps
its rows' K/V) and decodes one token at a time with :func:`drope.distributed.decode_attention` (every rank computes
the same new token); :func:`greedy_generate` is the loop. ``drope niah --context-parallel N`` uses the same decoder
through :mod:`drope.niah.decode`'s timed loop.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

import torch
from torch import Tensor

from .. import distributed as dd
from .parallel import _ACTIVE, ContextParallel, context_parallel

__all__ = ["ShardedPrompt", "greedy_generate"]


class ShardedPrompt:
    """Greedy decoding of one prompt whose KV cache stays sharded over the ranks.

    :meth:`prefill` runs the largest prefix the layout can split (a multiple of 2W, or W, strictly shorter than the
    prompt) across the ranks, each rank keeping its rows' K/V in its cache, then the remaining 1..2W tokens as one
    step every rank computes alike (the first new token's logits); :meth:`step` feeds one new token. New tokens' K/V
    are appended to every rank's cache (transformers' cache API) but live on the last rank only. ``logits``: the last
    forward's (B, V) logits of the next token (the same on every rank).
    """

    def __init__(self, cp: ContextParallel):
        from .modeling import cache_argument

        self.cp, self.model = cp, cp.model
        self.cache_name = cache_argument(self.model)
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
            self.model.forward).parameters else {}
        self.cache, self.logits, self.length = None, None, 0

    def _forward(self, ids: Tensor, positions: Tensor, cache=None, **extra) -> Tensor:
        if cache is not None:
            extra[self.cache_name] = cache
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **extra, **self.keep)
        self.cache, self.logits = getattr(out, self.cache_name), out.logits[:, -1]
        return self.logits.argmax(-1)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """The prompt (B, S), the same on every rank, across the ranks; returns the first new token (B,).

        Raises:
            ValueError: a prompt not longer than the layout's 2W (or W) chunks (naming ``input_ids``).
        """
        cp = self.cp
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, S) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        B, S = input_ids.shape
        parts = 2 * cp.world if cp.layout == "headtail" else cp.world
        head = (S - 1) // parts * parts
        if head == 0:
            raise ValueError(f"input_ids: a prompt of {S} tokens is too short to shard over {cp.world} ranks with "
                             f"layout {cp.layout!r} (more than {parts} tokens are needed)")
        local = dd.shard(input_ids[:, :head], group=cp.group, layout=cp.layout, dim=1)
        pos = dd.positions(head, group=cp.group, layout=cp.layout, device=input_ids.device)[None].expand(B, -1)
        extra = {}
        if cp._drope:
            # the temperature of the whole prompt, as one process's prefill has it (mode "length" reads its length)
            extra["drope_temperature"] = cp.temperature(torch.arange(S, device=input_ids.device)[None], head)
        self._forward(local, pos, **extra)
        rest = torch.arange(head, S, device=input_ids.device)[None].expand(B, -1)
        self.length = S
        return self._forward(input_ids[:, head:], rest, self.cache)

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed the last new token (B,) (the same on every rank); returns the next one."""
        pos = torch.full((token.shape[0], 1), self.length, dtype=torch.long, device=token.device)
        self.length += 1
        return self._forward(token[:, None], pos, self.cache)


def greedy_generate(model, input_ids: Tensor, max_new_tokens: int, *, group=None, layout: str = "headtail",
                    eos_token_ids: Sequence[int] = ()) -> Tensor:
    """Greedy generation with the prompt sharded over the ranks of ``group``; the same tokens on every rank.

    Args:
        model: a causal LM (see :func:`context_parallel`); used inside a block of its own if not already in one.
        input_ids: (B, S) prompt, the same on every rank; S > 2W (head-tail) or > W (contiguous).
        max_new_tokens: tokens to generate (fewer when every row has produced one of ``eos_token_ids``).
        group, layout: as :func:`context_parallel`.

    Returns:
        (B, n) int64 new tokens, n <= ``max_new_tokens``: what greedy decoding in one process gives.

    Raises:
        ValueError: ``max_new_tokens`` < 1; see :meth:`ShardedPrompt.prefill` and :func:`context_parallel`.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    active = _ACTIVE.get(id(model))
    block = contextlib.nullcontext(active) if active is not None else context_parallel(model, group, layout)
    with block as cp:
        decoder = ShardedPrompt(cp)
        tokens = [decoder.prefill(input_ids)]
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)
        done = torch.isin(tokens[0], eos)
        while len(tokens) < max_new_tokens and not bool(done.all()):
            tokens.append(decoder.step(tokens[-1]))
            done |= torch.isin(tokens[-1], eos)
    return torch.stack(tokens, 1)
