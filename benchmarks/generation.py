"""Throughput of generating for a batch of mixed-length prompts, four ways a user can do it with transformers.

- ``drope_cb``, ``sdpa``, ``paged|eager``: transformers' continuous batching (``model.generate_batch``, what
  ``transformers serve --continuous-batching`` runs) on drope's kernels (``drope.hf.continuous_batching_attention()``,
  the kernel repository the ``kernels`` package loads from a local directory), on SDPA, on the paged eager path; the
  paged cache sized to the batch (:func:`cb_config`).
- ``drope_triton``, ``sdpa_padded``: one ``model.generate`` call on the prompts left-padded to the longest, on
  drope's kernels / on SDPA.

Every request generates exactly ``new_tokens`` tokens (end of sequence disabled, not masked: ``min_new_tokens`` would
mask it and change greedy choices); tokens/s counts generated tokens
over the wall time of the whole batch. :func:`greedy_alone` gives each prompt's greedy tokens generated on its own,
the answer every way is compared with.
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

GENERATION_PROVIDERS = ("drope_cb", "sdpa", "paged|eager", "drope_triton", "sdpa_padded")
CB_PROVIDERS = ("drope_cb", "sdpa", "paged|eager")
PAD_ID = 0


def mixed_prompts(lengths: Sequence[int], vocab: int, *, seed: int = 0) -> List[List[int]]:
    """Random prompts of the given lengths (token ids 3..vocab-1: 0 is the pad id, 1 and 2 bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def cb_config(prompts: List[List[int]], new_tokens: int, *, page: int = 256):
    """A ``ContinuousBatchingConfig`` whose paged cache holds this batch: a page of ``page`` tokens per started
    ``page`` of every request, plus one. Left to its default, transformers sizes the cache from free memory, which on
    a CPU is the machine's RAM (14 GB allocated and zeroed for a 4-layer model here)."""
    from transformers import ContinuousBatchingConfig

    blocks = sum(-(-(len(p) + new_tokens) // page) for p in prompts) + 1
    return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=min(8192, sum(len(p) for p in prompts)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _padded(model, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
    return out[:, width:].tolist()


def generate(model, prompts: List[List[int]], provider: str, new_tokens: int, *,
             keep_manager: bool = False) -> List[List[int]]:
    """The tokens each prompt gets from ``provider`` (one of :data:`GENERATION_PROVIDERS`), in prompt order.

    ``keep_manager``: continuous batching keeps its manager (paged cache, worker) for the next call, as a server
    does (``generate_batch(persistent_manager=True)``); ``model.destroy_cached_continuous_batching_manager()``
    frees it.
    """
    from transformers import GenerationConfig

    if provider not in GENERATION_PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(GENERATION_PROVIDERS)}, got {provider!r}")
    if provider in ("drope_triton", "sdpa_padded"):
        model.set_attn_implementation("sdpa" if provider == "sdpa_padded" else provider)
        return _padded(model, prompts, new_tokens)
    if provider == "drope_cb":
        import drope

        model.set_attn_implementation(drope.hf.continuous_batching_attention())
    else:
        model.set_attn_implementation(provider)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, eos_token_id=-1)
    # not under inference_mode: its worker thread updates tensors made there (an error in transformers 5.17)
    results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False,
                                   continuous_batching_config=cb_config(prompts, new_tokens),
                                   persistent_manager=keep_manager)
    by_prompt: Dict[tuple, List[int]] = {tuple(r.prompt_ids): list(r.generated_tokens) for r in results.values()}
    return [by_prompt.get(tuple(p), []) for p in prompts]


def greedy_alone(model, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
    """Each prompt's greedy tokens, generated alone (no padding, no batching) with SDPA."""
    return [_padded(model, [p], new_tokens)[0] for p in prompts]


def measure(model, prompts: List[List[int]], provider: str, new_tokens: int, *, rounds: int = 3,
            want: List[List[int]] = None) -> Dict[str, object]:
    """Wall time of generating for the whole batch: the first call (``first_ms``: for continuous batching it also
    builds the manager, what one ``generate_batch`` call with defaults pays) and the median of ``rounds`` more
    (``ms``; continuous batching reuses the manager, as a server does).

    Returns ``{"ms", "times_ms", "first_ms", "tokens_per_s", "agree", "tokens"}``: ``agree`` counts the requests
    whose tokens equal ``want`` (when given). Raises ``RuntimeError`` when a request comes back with a wrong number
    of tokens.
    """
    device = next(model.parameters()).device
    cb = provider in CB_PROVIDERS
    times = []
    try:
        for _ in range(rounds + 1):
            _sync(device)
            t = time.perf_counter()
            got = generate(model, prompts, provider, new_tokens, keep_manager=cb)
            _sync(device)
            times.append((time.perf_counter() - t) * 1e3)
            short = [i for i, tokens in enumerate(got) if len(tokens) != new_tokens]
            if short:
                raise RuntimeError(f"{provider}: requests {short} returned {[len(got[i]) for i in short]} tokens, "
                                   f"not {new_tokens}")
    finally:
        if cb:
            model.destroy_cached_continuous_batching_manager()
    ms = statistics.median(times[1:])
    agree = None if want is None else sum(a == b for a, b in zip(got, want))
    return {"ms": ms, "times_ms": times[1:], "first_ms": times[0],
            "tokens_per_s": len(prompts) * new_tokens / (ms * 1e-3), "agree": agree, "tokens": got}
