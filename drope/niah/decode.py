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


@torch.inference_mode()
def greedy_generate(model, input_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int],
                    device: torch.device) -> Generation:
    """Greedy decoding with the KV cache: one timed prefill, then one timed forward per new token.

    The prefill produces the first new token; ``decode_steps`` counts the forwards after it.
    Only the last position's logits are computed (``logits_to_keep=1``) when the model supports it.
    """
    from drope.hf.modeling import cache_argument

    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_name = cache_argument(model)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    n = ids.shape[1]
    eos = set(eos_ids)
    with prof.PeakMemory(device) as mem:
        t0 = prof.now(device)
        out = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=True, **keep)
        token = out.logits[:, -1].argmax(-1)
        new = [int(token.item())]
        t1 = prof.now(device)
        past = getattr(out, cache_name)
        del out
        while len(new) < max_new_tokens and new[-1] not in eos:
            pos = torch.tensor([[n + len(new) - 1]], device=device)
            out = model(input_ids=token[:, None], position_ids=pos, use_cache=True, **{cache_name: past}, **keep)
            token = out.logits[:, -1].argmax(-1)
            past = getattr(out, cache_name)
            new.append(int(token.item()))
        t2 = prof.now(device)
    return Generation(new, (t1 - t0) * 1e3, t2 - t1, len(new) - 1, mem.peak_mb, mem.kind)


def measure_cell(model, samples: Sequence[Sample], eos: Sequence[int], device: torch.device, *, warmup: int,
                 on_request, bar) -> List[Generation]:
    """``warmup`` short unmeasured requests, then one measured greedy request per sample."""
    for _ in range(warmup):
        greedy_generate(model, samples[0].input_ids, min(4, samples[0].max_new_tokens), eos, device)
    gens = []
    for s in samples:
        g = greedy_generate(model, s.input_ids, s.max_new_tokens, eos, device)
        gens.append(g)
        if on_request is not None:
            on_request(s, g)
        bar.update(1)
    return gens


def trace_request(model, sample: Sample, eos: Sequence[int], device: torch.device, out_dir: Path) -> Path:
    """One more request of ``sample`` under ``torch.profiler``; returns the trace's path relative to ``out_dir``."""
    rel = Path("traces") / f"{sample.task}-{sample.length}.json"
    with prof.chrome_trace(out_dir / rel, device):
        greedy_generate(model, sample.input_ids, sample.max_new_tokens, eos, device)
    return rel

