"""The greedy decode loop of a NIAH request, timed and profiled, and the requests of one cell."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import profile as prof
from .tasks import Sample


def eos_token_ids(model, tokenizer) -> List[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return sorted(ids)


@dataclass
class Generation:
    """One greedy request: the new token ids and its profile."""

    token_ids: List[int]
    prefill_ms: float
    decode_s: float
    decode_steps: int
    peak_mem_mb: Optional[float]
    peak_mem_kind: str

    @property
    def decode_tok_s(self) -> Optional[float]:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else None


class CachedDecoder:
    """Greedy decoding in one process with the model's KV cache: :meth:`prefill` the prompt, then :meth:`step` one
    token at a time (the interface of :class:`drope.hf.parallel.ShardedPrompt`, the prompt sharded over ranks).
    Only the last position's logits are computed (``logits_to_keep=1``) when the model supports it; ``logits`` keeps
    the last forward's."""

    def __init__(self, model):
        from drope.hf.modeling import cache_argument

        self.model = model
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.cache_name = cache_argument(model)
        self.cache, self.logits, self.length = None, None, 0

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra = {} if self.cache is None else {self.cache_name: self.cache}
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **extra, **self.keep)
        self.cache, self.logits = getattr(out, self.cache_name), out.logits[:, -1]
        return self.logits.argmax(-1)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache, self.length = None, ids.shape[1]
        return self._forward(ids, torch.arange(self.length, device=ids.device)[None])

    def step(self, token: torch.Tensor) -> torch.Tensor:
        pos = torch.tensor([[self.length]], device=token.device)
        self.length += 1
        return self._forward(token[:, None], pos)


@torch.inference_mode()
def greedy_generate(model, input_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int],
                    device: torch.device, *, context=None) -> Generation:
    """Greedy decoding with the KV cache: one timed prefill, then one timed forward per new token.

    The prefill produces the first new token; ``decode_steps`` counts the forwards after it. ``context``: a
    :class:`drope.hf.parallel.ContextParallel` whose ranks share the prompt (every rank runs this call alike and
    gets the same tokens); None: one process (:class:`CachedDecoder`).
    """
    decoder = CachedDecoder(model) if context is None else context.decoder()
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    eos = set(eos_ids)
    with prof.PeakMemory(device) as mem:
        t0 = prof.now(device)
        token = decoder.prefill(ids)
        new = [int(token.item())]
        t1 = prof.now(device)
        while len(new) < max_new_tokens and new[-1] not in eos:
            token = decoder.step(token)
            new.append(int(token.item()))
        t2 = prof.now(device)
    return Generation(new, (t1 - t0) * 1e3, t2 - t1, len(new) - 1, mem.peak_mb, mem.kind)


def measure_cell(model, samples: Sequence[Sample], eos: Sequence[int], device: torch.device, *, warmup: int,
                 on_request, bar, context=None) -> List[Generation]:
    """``warmup`` short unmeasured requests, then one measured greedy request per sample."""
    kw = {} if context is None else {"context": context}  # one process: greedy_generate's five arguments
    for _ in range(warmup):
        greedy_generate(model, samples[0].input_ids, min(4, samples[0].max_new_tokens), eos, device, **kw)
    gens = []
    for s in samples:
        g = greedy_generate(model, s.input_ids, s.max_new_tokens, eos, device, **kw)
        gens.append(g)
        if on_request is not None:
            on_request(s, g)
        bar.update(1)
    return gens


def trace_request(model, sample: Sample, eos: Sequence[int], device: torch.device, out_dir: Path, *,
                  context=None) -> Path:
    """One more request of ``sample`` under ``torch.profiler``; returns the trace's path relative to ``out_dir``."""
    # under context parallelism every rank runs the request; each writes its own trace
    suffix = "" if context is None or context.rank == 0 else f"-rank{context.rank}"
    rel = Path("traces") / f"{sample.task}-{sample.length}{suffix}.json"
    with prof.chrome_trace(out_dir / rel, device):
        greedy_generate(model, sample.input_ids, sample.max_new_tokens, eos, device,
                        **({} if context is None else {"context": context}))
    return rel

