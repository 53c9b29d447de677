"""Worker of ``tests/test_hf_context_parallel.py``: one process per rank (started by ``cp_worker.run_ranks`` with
``script=`` this file, drope's PyTorch CPU kernels, gloo, file rendezvous), running every case of the spec in order.

Cases: ``train`` (a saved tiny model's forward on this rank's rows inside ``drope.hf.context_parallel``: local
logits, the loss share and the global loss, every parameter gradient after the all-reduce, the collectives of the
forward, the backward and the gradient all-reduce), ``generate`` (greedy tokens with the prompt's cache sharded),
``errors`` (bad input raises ``ValueError`` on every rank), ``cli`` (``drope niah`` / ``drope recalibrate`` with
``--context-parallel W``; last: ``drope recalibrate`` ends the process group).
"""

from __future__ import annotations

import os
import sys
import time

from cp_worker import serve


def _model(case):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case["model"], attn_implementation="eager")
    return model.float()


def _train(case, rank, world, counter, group):
    import drope.hf as dh

    model = _model(case)
    model.train()
    with dh.context_parallel(model, group, layout=case["layout"]) as cp:
        local = cp.shard_batch(case["batch"])
        counter.take()
        out = model(**local, use_cache=False)
        fwd = counter.take()
        out.loss.backward()
        bwd = counter.take()
        cp.all_reduce_gradients()
        grad_calls = counter.take()
        total = cp.reduce_loss(out.loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    return dict(logits=out.logits.detach(), share=out.loss.detach(), loss=total, grads=grads, fwd=fwd, bwd=bwd,
                grad_calls=grad_calls, positions=local["position_ids"], impl_after=impl)


def _generate(case, rank, world, counter, group):
    """Greedy tokens with the prompt's cache sharded, per layout, and the collectives of the prefill and each step
    (or the error, when the layout is refused)."""
    import torch

    import drope.hf as dh

    model = _model(case).eval()
    out = {}
    for layout in case["layouts"]:
        try:
            with dh.context_parallel(model, group, layout=layout) as cp:
                decoder = cp.decoder()
                counter.take()
                tokens = [decoder.prefill(case["prompt"])]
                prefill, steps, logits = counter.take(), [], [decoder.logits]
                while len(tokens) < case["new"]:
                    tokens.append(decoder.step(tokens[-1]))
                    steps.append(counter.take())
                    logits.append(decoder.logits)
            out[layout] = dict(tokens=torch.stack(tokens, 1), logits=torch.stack(logits, 1), prefill=prefill,
                               steps=steps)
        except ValueError as e:
            out[layout] = dict(raised=("ValueError", str(e)))
    return out


def _errors(case, rank, world, counter, group):
    import torch

    import drope.hf as dh
    from drope.hf.sharded_decode import greedy_generate

    model = _model(case).eval()
    ids = case["batch"]["input_ids"]
    subcases = {
        "odd_length": lambda cp: cp.shard_batch({"input_ids": ids[:, :-1]}),
        "padding": lambda cp: cp.shard_batch({"input_ids": ids, "attention_mask": torch.zeros_like(ids)}),
        "local_positions": lambda cp: model(input_ids=cp.shard_batch({"input_ids": ids})["input_ids"],
                                            position_ids=torch.arange(ids.shape[1] // world)[None]),
        "rows_differ": lambda cp: model(input_ids=ids[:, :2 * (rank + 1)]),
        "short_prompt": lambda cp: greedy_generate(model, ids[:, :2 * world], 2, group=group),
        "labels_shape": lambda cp: cp.shard_batch({"input_ids": ids, "labels": ids[:, :4]}),
    }
    out = {}
    with dh.context_parallel(model, group) as cp:
        for name, call in subcases.items():
            try:
                with torch.no_grad():
                    call(cp)
                out[name] = ("ok", "")
            except Exception as e:  # noqa: BLE001 - the parent checks type and message
                out[name] = (type(e).__name__, str(e))
        try:
            with dh.context_parallel(model, group):
                pass
            out["nested"] = ("ok", "")
        except ValueError as e:
            out["nested"] = ("ValueError", str(e))
    out["after"] = model.config._attn_implementation
    model.set_attn_implementation("drope_cp")
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :4])
        out["outside"] = ("ok", "")
    except Exception as e:  # noqa: BLE001
        out["outside"] = (type(e).__name__, str(e))
    return out


def _cli(case, rank, world, counter, group):
    from drope.cli import main

    start = time.perf_counter()
    rc = main(case["argv"])
    return dict(rc=rc, seconds=time.perf_counter() - start)


SCENARIOS = {"train": _train, "generate": _generate, "errors": _errors, "cli": _cli}


def main(argv):
    rank, world = argv[0], argv[1]
    # as torchrun sets them: accelerate (the Trainer) reads them, and finds the group already initialised
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world)
    import drope  # noqa: F401 - registers the DroPE model types and attention implementations with transformers

    serve(argv, lambda case, rank, W, counter, group: SCENARIOS[case["kind"]](case, rank, W, counter, group))


if __name__ == "__main__":
    main(sys.argv[1:])
