"""Recalibrate a model as DroPE: drop RoPE (converting if needed) and train briefly at the training length.

Python API :func:`recalibrate` (settings in a :class:`RecalibrateConfig`, or its fields as keywords) and the
``drope recalibrate`` subcommand (``add_arguments``/``run``).
Training is Hugging Face's ``Trainer``: AdamW with betas (0.9, 0.95), linear warmup then cosine decay,
learning rate 1e-3 by default (stable with QK-norm, as in the paper), bf16 mixed precision on GPU,
gradient checkpointing, checkpoints every ``save_steps`` and resumption from them. Because it is the
plain ``Trainer``, ``accelerate launch`` / ``torchrun`` (DDP), FSDP and DeepSpeed scale it past one GPU
without changes (pass their settings through ``training_args``). ``context_parallel=N`` under ``torchrun
--nproc_per_node N`` shards every training sequence over the N ranks instead (:mod:`drope.hf.cp_trainer`), so
sequences too long for one device's attention train with the loss and gradients of one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .. import data as drope_data

QK_NORMS = ("full", "head", "auto", "none")


@dataclass
class RecalibrationResult:
    """What :func:`recalibrate` did.

    Attributes:
        output_dir: where the final model, tokenizer and checkpoints are.
        converted: whether the input was a RoPE model converted with ``drope.to_drope``.
        seq_len: the training context length used.
        examples: training examples (rows, or packs of documents) in the dataset.
        global_step: optimizer steps done in all (resumed steps included).
        train_loss: the mean training loss reported by the Trainer for this run.
        log_history: the Trainer's log records (``loss``, ``learning_rate``, ``grad_norm``, ``step``, ...).
    """

    output_dir: str
    converted: bool
    seq_len: int
    examples: int
    global_step: int
    train_loss: float
    log_history: List[Dict[str, Any]] = field(default_factory=list)


def _is_drope_config(config) -> bool:
    return str(getattr(config, "model_type", "")).endswith("_drope")


def _default_seq_len(config) -> int:
    temperature = getattr(config, "drope_temperature", None) or {}
    seq_len = temperature.get("train_length") or getattr(config, "max_position_embeddings", None)
    if not seq_len:
        raise ValueError("the model config names no training length (max_position_embeddings); pass seq_len=")
    return int(seq_len)


def _resolve_resume(resume, output_dir: Path) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    if resume is None or resume is False:
        return None
    if resume is True:
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ValueError(f"resume=True but {str(output_dir)!r} holds no checkpoint-<step> directory to resume from")
        return last
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"resume checkpoint {str(path)!r} does not exist (give a checkpoint-<step> directory or True)")
    return str(path)


def _checkpoint_qk_norm(checkpoint: str) -> Optional[str]:
    """The QK-norm kind ("full", "head", "none") a DroPE checkpoint was trained with, None if unknown."""
    import json

    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if not str(config.get("model_type", "")).endswith("_drope"):
        return None
    return "none" if config.get("attention_type") == "nope" else config.get("qk_norm_type", "full")


def _load_model(model_path: Path, *, qk_norm: str, attn_implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .convert import to_drope

    config = AutoConfig.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    converted = not _is_drope_config(config)
    if converted:
        model = to_drope(model, qk_norm=None if qk_norm == "none" else qk_norm)
        model.set_attn_implementation(attn_implementation)
    return model, converted


@dataclass
class RecalibrateConfig:
    """How :func:`recalibrate` runs: what is DroPE's own, then the ``transformers.Trainer`` settings.

    The defaults are the paper's recipe: AdamW with betas (0.9, 0.95), learning rate 1e-3 (stable with
    QK-norm), linear warmup then cosine decay. Fields ``transformers.TrainingArguments`` has under another
    name (or not at all) are mapped by :func:`recalibrate`; any other ``TrainingArguments`` field goes in
    ``training_args``.

    Attributes:
        seq_len: training context length; None = the model's (``drope_temperature["train_length"]``,
            else ``max_position_embeddings``).
        qk_norm: QK-norm added when converting: ``"full"`` (over all heads, as the paper), ``"head"``
            (per head, fused into the kernel), ``"auto"`` (``"head"`` for Qwen3, which keeps its own
            trained per-head norms and accepts only these two, else ``"full"``) or ``"none"``. None =
            ``"auto"`` for a fresh run and the checkpoint's kind when resuming (another explicit kind
            than the checkpoint's is an error). Ignored for a model that already is DroPE.
        packed: pack whole documents with boundaries instead of cutting the concatenated stream.
        text_field: JSON field with the text in ``.jsonl`` files.
        bin_dtype: integer dtype of ``.bin`` token files.
        attn_implementation: attention used in training; None = ``"drope_triton"`` on CUDA, ``"sdpa"``
            on CPU.
        resume: None/False = start afresh; True = the last checkpoint in the output directory; a path =
            that checkpoint. Passed to ``trainer.train(resume_from_checkpoint=...)``.
        learning_rate: peak AdamW learning rate (1e-3 is the paper's value with QK-norm; use a lower
            one without QK-norm).
        warmup_steps: linear warmup, in steps (int) or as a fraction of all steps (float < 1).
        weight_decay: AdamW weight decay (not applied to norms and biases).
        num_train_epochs: passes over the data when ``max_steps`` is -1.
        max_steps: optimizer steps in all; -1 = decided by ``num_train_epochs``.
        batch_size: examples per device per step (rows, or packs when ``packed``).
        gradient_accumulation_steps: micro-batches per optimizer step.
        save_steps: save a checkpoint every this many steps.
        save_total_limit: keep at most this many checkpoints (None = all).
        logging_steps: log loss and learning rate every this many steps.
        bf16: bf16 mixed precision (fp32 master weights); None = on when CUDA supports bf16.
        gradient_checkpointing: recompute activations in backward to save memory.
        max_grad_norm: gradient clipping norm.
        seed: seed of initialisation-free randomness (data order, dropout).
        show_progress: show the Trainer's progress bars.
        context_parallel: ranks each training sequence is sharded over (head-tail layout, ``"drope_cp"``
            attention); > 1 runs under ``torchrun --nproc_per_node`` that many processes (the world is the
            context group; no data parallelism on top), ``seq_len`` a multiple of 2x it, not ``packed``.
        training_args: extra ``transformers.TrainingArguments`` fields; they override the ones above.

    Raises:
        ValueError: (when built) a bad ``qk_norm`` or ``seq_len``, an unknown ``training_args`` field, a bad
            ``context_parallel`` (or one with ``packed`` or a ``seq_len`` it cannot split).
    """

    seq_len: Optional[int] = None
    qk_norm: Optional[str] = None
    packed: bool = False
    text_field: str = "text"
    bin_dtype: str = "uint16"
    attn_implementation: Optional[str] = None
    resume: Union[bool, str, os.PathLike, None] = None
    learning_rate: float = 1e-3
    warmup_steps: float = 0.05
    weight_decay: float = 0.1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    logging_steps: int = 10
    bf16: Optional[bool] = None
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0
    show_progress: bool = True
    context_parallel: int = 1
    training_args: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cp = self.context_parallel
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
            raise ValueError(f"context_parallel must be an int >= 1, got {cp!r}")
        if cp > 1 and self.packed:
            raise ValueError("context_parallel > 1 does not take packed=True (packed documents are not sharded across "
                             "ranks yet); train on fixed-length rows")
        if cp > 1 and self.seq_len is not None and self.seq_len % (2 * cp):
            raise ValueError(f"seq_len {self.seq_len} must be a multiple of 2 x context_parallel = {2 * cp} (the "
                             "head-tail layout cuts every sequence into 2N chunks)")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be None or one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")
        seq_len = self.seq_len
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
            raise ValueError(f"seq_len must be None or an int >= 2, got {seq_len!r}")
        self.training_args = dict(self.training_args or {})
        if self.training_args:
            from transformers import TrainingArguments

            unknown = sorted(set(self.training_args) - set(TrainingArguments.__dataclass_fields__))
            if unknown:
                raise ValueError(
                    f"training_args has field(s) {unknown} that transformers.TrainingArguments does not know")


def _training_arguments(cfg: RecalibrateConfig, output_dir: Path, *, cuda: bool, bf16: bool):
    """``transformers.TrainingArguments`` of the run: the paper's optimiser, ``cfg``'s settings, then
    ``cfg.training_args`` over them."""
    from transformers import TrainingArguments

    args = dict(
        output_dir=str(output_dir), learning_rate=cfg.learning_rate, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=cfg.weight_decay, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm, bf16=bf16,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps, report_to="none", disable_tqdm=not cfg.show_progress, seed=cfg.seed,
        remove_unused_columns=False, dataloader_pin_memory=cuda,
        # without it, processes started by torchrun on a CPU-only machine each train alone (accelerate sees no
        # distributed run); with it they train data-parallel over gloo
        use_cpu=not cuda,
    )
    # transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    ckpt = "activation_checkpointing"
    if ckpt not in TrainingArguments.__dataclass_fields__:
        ckpt = "gradient_checkpointing"
    args[ckpt] = cfg.gradient_checkpointing
    args[f"{ckpt}_kwargs"] = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    args.update(cfg.training_args)
    return TrainingArguments(**args)


def _check_model_dir(model_path: Path) -> None:
    if not model_path.is_dir():
        raise ValueError(f"model path {str(model_path)!r} does not exist or is not a directory")
    if not (model_path / "config.json").is_file():
        raise ValueError(f"model path {str(model_path)!r} holds no config.json; give a saved Hugging Face model directory")


def _load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"model path {str(model_path)!r} holds no loadable tokenizer ({err})") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ValueError(f"model path {str(model_path)!r} holds no tokenizer")
    return tokenizer


def _dataset(docs, *, packed: bool, seq_len: int, separator_id: Optional[int]):
    """(dataset, collator): whole documents packed with boundaries, or fixed-length rows of the stream."""
    if packed:
        return drope_data.PackDataset(drope_data.pack_documents(docs, seq_len)), drope_data.PackedCollator()
    rows = drope_data.chunk_documents(docs, seq_len, separator_id=separator_id)
    return drope_data.ChunkDataset(rows), drope_data.CausalLMCollator()


def _context_parallel(cfg: RecalibrateConfig, model, args, seq_len: int):
    """``drope.hf.context_parallel`` over the world when ``cfg.context_parallel`` > 1, else a block yielding None."""
    import contextlib

    cp = cfg.context_parallel
    if cp == 1:
        return contextlib.nullcontext()
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len {seq_len} must be a multiple of 2 x context_parallel = {2 * cp} (the head-tail "
                         "layout cuts every sequence into 2N chunks)")
    world = args.world_size  # under torchrun this sets up the process group (accelerate)
    if world != cp:
        raise ValueError(f"context_parallel={cp} runs on a world of {cp} processes (torchrun --nproc_per_node {cp}); "
                         f"this run has {world} (data parallel x context parallel is not implemented)")
    from .parallel import context_parallel

    return context_parallel(model)


def recalibrate(model_path: Union[str, os.PathLike], data_files: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                output_dir: Union[str, os.PathLike], config: Optional[RecalibrateConfig] = None,
                **settings: Any) -> RecalibrationResult:
    """Convert a local model to DroPE (if it is a RoPE model) and recalibrate it on local data.

    A RoPE model (any causal LM ``drope.to_drope`` accepts) is converted with QK-norm ``qk_norm``; a
    DroPE model (``model_type`` ``*_drope``) is trained as it is. The data files are tokenized with the
    model's tokenizer and cut at ``seq_len`` tokens: fixed-length rows of the concatenated stream, or,
    with ``packed=True``, whole documents packed up to ``seq_len`` tokens and flattened per batch into
    one row with ``cu_seqlens`` boundaries (``DataCollatorWithFlattening``), so no token attends across
    documents (with ``"drope_triton"`` the kernel reads the boundaries directly). Checkpoints go to
    ``output_dir/checkpoint-<step>``; the final model and tokenizer to ``output_dir``, loadable with
    ``AutoModelForCausalLM.from_pretrained(output_dir)`` after ``import drope``. A converted model's
    config records ``seq_len`` as the temperature's ``train_length`` (mode ``"none"``), which
    :func:`drope.fit_temperature` then reads.

    The run is a plain ``transformers.Trainer``: launched with ``accelerate launch`` or ``torchrun`` it
    trains data-parallel; FSDP / DeepSpeed are set through ``training_args`` (e.g. ``{"fsdp": "full_shard"}``
    or ``{"deepspeed": "ds.json"}``). ``batch_size`` is per device.

    Args:
        model_path: a local directory with a causal LM (``config.json``, weights) and its tokenizer.
        data_files: local files or directories of ``.txt``, ``.jsonl``, ``.npy`` or ``.bin`` data
            (see ``drope.data``).
        output_dir: where checkpoints, the final model and tokenizer are written.
        config: the run's settings (:class:`RecalibrateConfig`); None = its defaults.
        **settings: :class:`RecalibrateConfig` fields by name, over ``config``'s
            (``recalibrate(model, data, out, max_steps=20, packed=True)``).

    Returns:
        A :class:`RecalibrationResult`.

    Raises:
        ValueError: a model path that does not exist or holds no config, no tokenizer, no data files, an
            unsupported data file type, out-of-vocabulary token ids, too little data for one example, a
            bad ``qk_norm`` or ``seq_len``, a resume checkpoint that does not exist or was trained with
            another QK-norm, an unknown ``training_args`` field.
        TypeError: a keyword that is not a :class:`RecalibrateConfig` field.
    """
    from transformers import Trainer, set_seed

    from .temperature import set_temperature

    cfg = dataclasses.replace(config or RecalibrateConfig(), **settings)
    model_path, output_dir = Path(model_path), Path(output_dir)
    _check_model_dir(model_path)
    files = drope_data.resolve_data_files(data_files)
    tokenizer = _load_tokenizer(model_path)
    resume_from = _resolve_resume(cfg.resume, output_dir)
    trained_norm = _checkpoint_qk_norm(resume_from) if resume_from else None
    qk_norm = cfg.qk_norm
    if trained_norm is not None and qk_norm not in (None, "auto", trained_norm):
        raise ValueError(f"qk_norm={qk_norm!r} but the checkpoint {resume_from!r} was trained with qk_norm="
                         f"{trained_norm!r}; resume with the same kind (or leave qk_norm unset)")
    if qk_norm is None:
        qk_norm = trained_norm or "auto"

    cuda = torch.cuda.is_available()
    attn_implementation = cfg.attn_implementation
    if attn_implementation is None:
        attn_implementation = "drope_triton" if cuda else "sdpa"
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda and torch.cuda.is_bf16_supported()
    set_seed(cfg.seed)
    model, converted = _load_model(model_path, qk_norm=qk_norm, attn_implementation=attn_implementation)
    seq_len = cfg.seq_len if cfg.seq_len is not None else _default_seq_len(model.config)
    if converted and getattr(model.config, "drope_temperature", None) is None:
        # record the recalibration length: fit_temperature reads its L_train from here
        set_temperature(model, {"mode": "none", "train_length": seq_len})

    docs = drope_data.load_documents(files, tokenizer, text_field=cfg.text_field, bin_dtype=cfg.bin_dtype,
                                     vocab_size=model.config.vocab_size)
    dataset, collator = _dataset(docs, packed=cfg.packed, seq_len=seq_len, separator_id=tokenizer.eos_token_id)

    use_cache = getattr(model.config, "use_cache", True)
    model.config.use_cache = False
    args = _training_arguments(cfg, output_dir, cuda=cuda, bf16=bf16)
    with _context_parallel(cfg, model, args, seq_len) as context:
        kwargs = dict(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer)
        if context is None:
            trainer = Trainer(**kwargs)
        else:
            from .cp_trainer import ContextParallelTrainer

            trainer = ContextParallelTrainer(context=context, **kwargs)
        output = trainer.train(resume_from_checkpoint=resume_from)

    model.config.use_cache = use_cache
    trainer.save_model(str(output_dir))
    trainer.save_state()
    return RecalibrationResult(output_dir=str(output_dir), converted=converted, seq_len=seq_len,
                               examples=len(dataset), global_step=output.global_step,
                               train_loss=float(output.training_loss), log_history=list(trainer.state.log_history))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``drope recalibrate``."""
    parser.add_argument("model", help="local model directory (RoPE or DroPE) with its tokenizer")
    parser.add_argument("data", nargs="+", help="local data files or directories: .txt, .jsonl (field --text-field), .npy, .bin")
    parser.add_argument("-o", "--output-dir", required=True, help="where checkpoints, the final model and tokenizer go")
    parser.add_argument("--seq-len", type=int, default=None, help="training context length (default: the model's)")
    parser.add_argument("--qk-norm", choices=QK_NORMS, default=None,
                        help="QK-norm added when converting a RoPE model (default: auto = full over all heads as the paper, "
                             "head for Qwen3 which keeps its per-head norms; the checkpoint's kind when resuming)")
    parser.add_argument("--packed", action="store_true",
                        help="pack whole documents with cu_seqlens boundaries instead of cutting one stream")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3, as the paper with QK-norm)")
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup steps (int) or fraction of all steps (< 1; default 0.05)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is not given")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps in all (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per device per step")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every this many steps")
    parser.add_argument("--save-total-limit", type=int, default=None, help="keep at most this many checkpoints")
    parser.add_argument("--logging-steps", type=int, default=10, help="log every this many steps")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the last checkpoint in --output-dir, or from CHECKPOINT")
    parser.add_argument("--attn-implementation", default=None,
                        help="attention for training (default: drope_triton on CUDA, sdpa on CPU)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 mixed precision (default: on with a bf16 GPU)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep activations instead of recomputing them")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files")
    parser.add_argument("--bin-dtype", default="uint16", help="integer dtype of .bin token files (default: uint16)")
    parser.add_argument("--no-progress", dest="show_progress", action="store_false", help="hide progress bars")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="shard every training sequence over N ranks (run under torchrun --nproc_per_node N; "
                             "--seq-len a multiple of 2N; not with --packed)")
    parser.add_argument("--trainer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra transformers.TrainingArguments field, VALUE parsed as JSON when it can be "
                             "(repeatable; e.g. fsdp=full_shard, deepspeed=ds.json, save_only_model=true)")


def _trainer_args(items: Sequence[str]) -> Dict[str, Any]:
    import json

    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--trainer-arg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _end_process_group() -> None:
    """The command ends its process: leave torchrun's process group cleanly (a group left alive at
    interpreter exit can abort a rank with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Run ``drope recalibrate``; bad input prints one error line and returns 2."""
    warmup = int(args.warmup) if args.warmup >= 1 else args.warmup
    try:
        extra = _trainer_args(args.trainer_arg)
        config = RecalibrateConfig(
            seq_len=args.seq_len, qk_norm=args.qk_norm, packed=args.packed, text_field=args.text_field,
            bin_dtype=args.bin_dtype, attn_implementation=args.attn_implementation, resume=args.resume,
            learning_rate=args.lr, warmup_steps=warmup, weight_decay=args.weight_decay, num_train_epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            save_steps=args.save_steps, save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, max_grad_norm=args.max_grad_norm,
            seed=args.seed, show_progress=args.show_progress, context_parallel=args.context_parallel,
            training_args=extra,
        )
        result = recalibrate(args.model, args.data, args.output_dir, config)
    except ValueError as err:
        print(f"drope recalibrate: error: {err}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()
    print(f"recalibrated {'converted RoPE -> DroPE ' if result.converted else ''}model saved to {result.output_dir} "
          f"({result.global_step} steps, {result.examples} examples of {result.seq_len} tokens, "
          f"mean train loss {result.train_loss:.4f})")
    return 0
