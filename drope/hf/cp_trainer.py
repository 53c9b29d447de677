"""A ``transformers.Trainer`` whose every training sequence is sharded over the ranks of a context-parallel group.

Used by ``drope recalibrate --context-parallel N`` under ``torchrun --nproc_per_node N`` (the context group is the
whole world: data parallel x context parallel is not implemented). What differs from the plain Trainer, and why:

- **Data**: every rank iterates the batches one process would (the accelerate shard wrapper made a passthrough, as
  the Trainer itself does for its rank-aware samplers), so the ranks hold the same batch and each takes its rows.
- **Loss**: :meth:`ContextParallel.shard_batch` shifts the labels globally and hands the model the global target
  count (over every micro-batch of the step: the count is not gathered across ranks, which hold the same batches),
  so each rank's ``outputs.loss`` is its share and the shares sum to one process's loss.
- **Gradients**: accelerate wraps the model in DDP over the same ranks, which *averages* gradients; the loss a rank
  backpropagates is W times its share (the average of W shares x W is their sum: the full gradient), with the value
  replaced by the global loss (so logging, which averages the ranks' values, reports one process's loss).
"""

from __future__ import annotations

from transformers import Trainer

from .parallel import ContextParallel

__all__ = ["ContextParallelTrainer"]


class ContextParallelTrainer(Trainer):
    """``Trainer`` for a model inside :func:`drope.hf.context_parallel` (``context``), with the world as its group."""

    def __init__(self, *args, context: ContextParallel, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = context
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if not kind.startswith("MULTI_") or self.accelerator.num_processes != context.world:
            raise ValueError(f"context parallelism trains under DDP over the context group's {context.world} ranks; "
                             f"accelerate runs {kind} over {self.accelerator.num_processes} process(es) (FSDP, "
                             "DeepSpeed and data parallel x context parallel are not supported)")

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        shard = getattr(loader, "batch_sampler", None)
        if shard is None or not hasattr(shard, "num_processes"):
            raise ValueError("context parallelism needs a map-style training dataset (every rank iterates the same "
                             f"batches); got a {type(self.train_dataset).__name__} loaded as {type(loader).__name__}")
        shard.num_processes, shard.process_index = 1, 0
        return loader

    def _get_num_items_in_batch(self, batch_samples, device):
        labels = [b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:] for b in batch_samples
                  if "labels" in b or "shift_labels" in b]
        if not labels:
            return None
        return sum(x.ne(-100).sum() for x in labels).to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        local = self.context.shard_batch(inputs, num_items_in_batch=num_items_in_batch)
        outputs = model(**local)
        share = outputs.loss
        total = self.context.reduce_loss(share)
        scaled = share * self.context.world
        loss = scaled + (total - scaled).detach()
        return (loss, outputs) if return_outputs else loss
