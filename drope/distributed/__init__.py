"""Context parallelism: one sequence sharded over the ranks of a ``torch.distributed`` process group.

``import drope.distributed as dd`` (docs/context_parallel.md explains the design and what each collective moves):

- :func:`shard`: this rank's rows of a full tensor. No communication.
- :func:`unshard`: the full tensor on every rank. Signature check + 1 all-gather.
- :func:`positions`: int64 global positions of this rank's rows. No communication.
- :func:`attention`: this rank's rows of ``drope.kernels.attention`` on the full sequence, forward and backward.
  Forward: check + 1 K/V all-gather; backward: 1 K/V all-gather + 1 dK/dV reduce-scatter.
- :func:`decode_attention`: ``drope.kernels.decode_attention`` over a cache sharded by rank, on every rank.
  Check + (the lengths, when positions matter) + 1 (out, lse) all-gather.
- :func:`merge_attention_states`: log-sum-exp merge of partial results. No group needed.

Modules: ``layout`` (layouts, sharding, group resolution), ``collectives`` (``drope::cp_all_gather`` /
``drope::cp_reduce_scatter`` operators with autograd, the cross-rank signature check), ``prefill``
(``drope::cp_attention`` and its backward), ``decode`` (``drope::cp_decode``, the merge), ``balance`` (the forward's
tiles per rank, bytes per collective).
"""

from .decode import decode_attention, merge_attention_states
from .layout import LAYOUTS, positions, shard, unshard
from .prefill import attention

__all__ = ["LAYOUTS", "attention", "decode_attention", "merge_attention_states", "positions", "shard", "unshard"]
