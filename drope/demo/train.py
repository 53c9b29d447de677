"""``drope train-mini``: the seeded recipe behind the shipped mini RoPE / NoPE / DroPE models.

Three variants with the same token budget (``steps`` rows of ``batch`` x ``L_train`` tokens each):

- ``rope``: a small Llama trained with RoPE for ``steps`` steps;
- ``nope``: the same model with no positional encoding (a ``llama_drope`` model without QK-norm)
  trained from scratch for ``steps`` steps on the same data;
- ``drope``: the RoPE run up to step ``steps - recal_steps``, then RoPE dropped and QK-norm added
  (:func:`drope.to_drope`) and trained for the last ``recal_steps`` steps at a high learning rate
  (the paper's pretraining integration), on the rows the RoPE run sees at those steps.

A plain PyTorch loop (AdamW, warm-up then cosine decay) rather than the HF Trainer: on a 2-core CPU
it is simpler and faster, and the whole recipe fits in one file. The loss is next-token cross-entropy
over every token, with target tokens (the retrieved values and EOS, and the repeats of copy episodes)
weighted ``1 + answer_weight`` so that the CPU budget is spent on copying and retrieval rather than
on the filler text.

After training, the softmax-temperature coefficient of the DroPE (and NoPE) model is fitted with
:func:`drope.hf.fit.fit_temperature` on held-out NIAH prompts of ``fit_factor * L_train`` tokens and
stored in the model config. Every model is saved with ``save_pretrained`` beside the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

VARIANTS = ("rope", "nope", "drope")

SIZES = {
    # name: hidden, layers, heads (head_dim 64 so drope_triton's kernels take it on GPU), ffn
    "mini": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128),
}


@dataclass
class Recipe:
    """Every setting of a training run (written to ``manifest.json``)."""

    size: str = "mini"
    train_length: int = 256
    steps: int = 5000
    batch: int = 8
    lr: float = 1e-3
    recal_lr: float = 1e-3
    recal_fraction: float = 0.4
    warmup: float = 0.05
    weight_decay: float = 0.1
    # recalibration's optimiser: ours (AdamW 0.9/0.95, wd 0.1, 10 % warm-up then cosine) by default;
    # SakanaAI's DroPE configs use wd 0, beta2 0.999, 10 % warm-up then constant (--recal-preset sakana)
    recal_weight_decay: float = 0.1
    recal_beta2: float = 0.95
    recal_schedule: str = "cosine"
    answer_weight: float = 4.0
    vocab_size: int = 1024
    rope_theta: float = 10000.0
    seed: int = 0
    fit_factor: int = 4
    fit_windows: int = 4
    eval_every: int = 100
    # value types of the retrieval and quiz rows (corpus.RowSampler): the shipped models see both, so
    # the demo's word column measures finding a needle apart from copying a 7-digit value
    value_types: Tuple[str, ...] = ("number", "word")
    threads: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        for name in ("train_length", "steps", "batch", "vocab_size", "fit_factor", "fit_windows", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.train_length < 128:
            raise ValueError(f"train_length must be >= 128 (room for four needles and the question), got {self.train_length}")
        if not 0.0 < self.recal_fraction < 1.0:
            raise ValueError(f"recal_fraction must be in (0, 1), got {self.recal_fraction!r}")
        if not (self.lr > 0 and self.recal_lr > 0):
            raise ValueError(f"lr and recal_lr must be positive, got {self.lr!r}, {self.recal_lr!r}")
        if self.recal_schedule not in ("cosine", "constant"):
            raise ValueError(f"recal_schedule must be cosine or constant, got {self.recal_schedule!r}")
        if not 0.0 <= self.recal_beta2 < 1.0 or self.recal_weight_decay < 0:
            raise ValueError(f"recal_beta2 must be in [0, 1) and recal_weight_decay >= 0, got "
                             f"{self.recal_beta2!r}, {self.recal_weight_decay!r}")
        if self.answer_weight < 0:
            raise ValueError(f"answer_weight must be >= 0, got {self.answer_weight!r}")
        from .corpus import check_value_types

        self.value_types = check_value_types(tuple(self.value_types), repeats=False)
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def torch_device(self) -> torch.device:
        """``auto``: CUDA when available, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine")
        return torch.device(self.device)

    @property
    def recal_steps(self) -> int:
        return max(1, round(self.steps * self.recal_fraction))


def build_config(recipe: Recipe, tokenizer):
    """The Llama config of the RoPE model (the NoPE and DroPE models are its ``llama_drope`` twins)."""
    from transformers import LlamaConfig

    size = SIZES[recipe.size]
    return LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=recipe.train_length, rms_norm_eps=1e-5,
        num_key_value_heads=size["num_attention_heads"], head_dim=size["hidden_size"] // size["num_attention_heads"],
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **size,
    )


def new_model(recipe: Recipe, tokenizer, variant: str):
    """A freshly initialised (seeded) RoPE Llama, or for ``nope`` the same initial weights without RoPE."""
    from transformers import LlamaForCausalLM

    from ..hf.convert import to_drope

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(build_config(recipe, tokenizer))
    model.set_attn_implementation("sdpa")
    if variant == "nope":
        model = to_drope(model, qk_norm=None)
    return model


def weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor,
                  answer_weight: float) -> torch.Tensor:
    """Next-token cross-entropy with answer tokens weighted ``1 + answer_weight``."""
    tgt = input_ids[:, 1:]
    w = 1.0 + answer_weight * answer_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.flatten(), reduction="none")
    return (nll * w.flatten()).sum() / w.sum()


@torch.no_grad()
def answer_accuracy(model, batch: Dict[str, torch.Tensor]) -> float:
    """Teacher-forced accuracy on answer tokens (the retrieved digits): a cheap retrieval probe."""
    was = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    model.train(was)
    pred = logits[:, :-1].argmax(-1)
    m = batch["answer_mask"][:, 1:].bool()
    return float((pred[m] == batch["input_ids"][:, 1:][m]).float().mean())


def _lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_steps(model, sampler, recipe: Recipe, *, first: int, last: int, total: int, lr: float, warmup: int,
                log: List[Dict[str, object]], name: str, probe: Dict[str, torch.Tensor],
                optimizer: Optional[torch.optim.Optimizer] = None, lr_offset: int = 0,
                weight_decay: Optional[float] = None, beta2: float = 0.95,
                schedule: str = "cosine", after_step: Optional[Callable[[int], None]] = None) -> torch.optim.Optimizer:
    """Train ``model`` on rows of steps ``first .. last-1`` (step s reads rows ``s*batch ..``);
    ``after_step(n)`` is called after the n-th step (1-based) when given."""
    if optimizer is None:
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        other = [p for n, p in model.named_parameters() if p.dim() < 2]
        wd = recipe.weight_decay if weight_decay is None else weight_decay
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                       {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, beta2))
    model.train()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for step in range(first, last):
        cur = _lr_at(step - lr_offset, total, lr, warmup, schedule)
        for g in optimizer.param_groups:
            g["lr"] = cur
        batch = {k: v.to(device) for k, v in sampler.batch(step * recipe.batch, recipe.batch).items()}
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = weighted_loss(logits, batch["input_ids"], batch["answer_mask"], recipe.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == last or step == first:
            acc = answer_accuracy(model, probe)
            row = {"variant": name, "step": step + 1, "loss": round(float(loss.detach()), 4), "lr": cur,
                   "answer_acc": round(acc, 4), "elapsed_s": round(time.perf_counter() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
        if after_step is not None:
            after_step(step + 1)
    return optimizer


def save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def fit(model, tokenizer, recipe: Recipe) -> Dict[str, object]:
    """Fit the temperature coefficient on held-out NIAH prompts of ``fit_factor * L_train`` tokens."""
    from ..hf.fit import fit_temperature
    from .corpus import niah_stream

    target = recipe.fit_factor * recipe.train_length
    ids = niah_stream(tokenizer, target, recipe.fit_windows, seed=recipe.seed)
    result = fit_temperature(model, ids, target_length=target, train_length=recipe.train_length, mode="length",
                             batch_size=4, show_progress=False)
    return {"coef": result.coef, "mode": result.mode, "train_length": result.train_length,
            "target_length": target, "perplexity": result.perplexity, "curve": result.curve}


# the settings the RoPE run depends on: a DroPE branch may start from another run's RoPE snapshot
# (--rope-from) only when these agree
ROPE_FIELDS = ("size", "train_length", "steps", "batch", "lr", "warmup", "weight_decay", "answer_weight",
               "vocab_size", "rope_theta", "seed", "value_types")
SNAPSHOT_DIR = "rope_snapshots"


def snapshot_steps(recipe: Recipe) -> List[int]:
    """The RoPE steps a run keeps weights of (every tenth of the run): the cuts of recal fractions 0.1 .. 0.9."""
    return sorted({round(recipe.steps * k / 10) for k in range(1, 10)} - {0, recipe.steps})


def load_rope_snapshot(recipe: Recipe, run_dir: Path, step: int) -> Dict[str, torch.Tensor]:
    """The RoPE weights at ``step`` of the earlier (or still running) run in ``run_dir``.

    Raises:
        ValueError: ``run_dir`` has no snapshots, a RoPE setting differs from ``recipe``'s, or no
            snapshot was kept at ``step`` (yet: a run still in progress keeps them as it goes).
    """
    run_dir = Path(run_dir)
    try:
        # written when the RoPE run starts, so its snapshots serve while it is still running
        theirs = json.loads((run_dir / SNAPSHOT_DIR / "recipe.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"rope_from: {run_dir} holds no RoPE snapshots of drope train-mini ({e})") from None
    ours = asdict(recipe)
    ours["value_types"] = list(ours["value_types"])
    diff = [f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in ROPE_FIELDS if theirs.get(k) != ours[k]]
    if diff:
        raise ValueError(f"rope_from: the RoPE run in {run_dir} used other settings: {'; '.join(diff)}")
    path = run_dir / SNAPSHOT_DIR / f"step_{step}.pt"
    if not path.exists():
        kept = sorted(int(p.stem.split("_")[1]) for p in (run_dir / SNAPSHOT_DIR).glob("step_*.pt"))
        raise ValueError(f"rope_from: no RoPE snapshot at step {step} (the cut of recal_fraction "
                         f"{recipe.recal_fraction}) in {run_dir}; kept: {kept or 'none'}")
    return torch.load(path, map_location="cpu", weights_only=True)


def train_all(recipe: Recipe, out: Path, variants=VARIANTS, rope_from: Optional[Path] = None) -> Dict[str, object]:
    """Run the recipe and write ``out/{tokenizer,rope,nope,drope}`` and ``out/manifest.json``.

    Args:
        recipe: the settings.
        out: output directory (created). A run that trains RoPE also keeps its weights every tenth of
            the run in ``out/rope_snapshots/`` (~5 MB each at the mini size), so DroPE branches with
            other recalibration settings can start from them (``rope_from``).
        variants: which of ``rope``, ``nope``, ``drope`` to produce (``drope`` needs the RoPE run,
            which is done even when ``rope`` is not asked for, unless ``rope_from`` is given).
        rope_from: an earlier output directory whose RoPE run (same RoPE settings) the DroPE branch
            starts from, instead of repeating the RoPE steps before the cut.

    Returns:
        The manifest: recipe, per-variant wall times, fitted temperatures, the training log.

    Raises:
        ValueError: an unknown variant; ``rope_from`` with ``rope`` asked for, or not matching.
    """
    from ..hf.convert import to_drope
    from .corpus import HELD_OUT_SEED_OFFSET, RowSampler, train_tokenizer

    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be a non-empty subset of {', '.join(VARIANTS)}, got {list(variants)}")
    if rope_from is not None and (list(variants) != ["drope"]):
        raise ValueError(f"rope_from recalibrates an earlier RoPE run: variants must be drope alone, got {list(variants)}")
    cut = recipe.steps - recipe.recal_steps
    snapshot = load_rope_snapshot(recipe, rope_from, cut) if rope_from is not None else None
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = recipe.torch_device()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = train_tokenizer(recipe.vocab_size, seed=recipe.seed)
    tokenizer.save_pretrained(out / "tokenizer")
    sampler = RowSampler(tokenizer, recipe.train_length, seed=recipe.seed, value_types=recipe.value_types)
    probe_rows = RowSampler(tokenizer, recipe.train_length, seed=recipe.seed + HELD_OUT_SEED_OFFSET,
                            value_types=recipe.value_types).batch(0, 32)
    probe = {k: v.to(device) for k, v in probe_rows.items()}
    warmup = max(1, round(recipe.warmup * recipe.steps))
    log: List[Dict[str, object]] = []
    times: Dict[str, float] = {}
    fits: Dict[str, object] = {}
    keep = set(snapshot_steps(recipe))

    if "rope" in variants or "drope" in variants:
        t0 = time.perf_counter()
        model = new_model(recipe, tokenizer, "rope").to(device)

        if snapshot is None:
            (out / SNAPSHOT_DIR).mkdir(exist_ok=True)
            (out / SNAPSHOT_DIR / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))

        def keep_snapshot(n: int) -> None:
            if n in keep:
                # written aside and renamed: a --rope-from run reading it meanwhile sees all of it or nothing
                tmp = out / SNAPSHOT_DIR / f".step_{n}.pt.tmp"
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
                tmp.replace(out / SNAPSHOT_DIR / f"step_{n}.pt")

        if snapshot is None:
            opt = train_steps(model, sampler, recipe, first=0, last=cut, total=recipe.steps, lr=recipe.lr,
                              warmup=warmup, log=log, name="rope", probe=probe, after_step=keep_snapshot)
        else:
            model.load_state_dict(snapshot)
            print(json.dumps({"variant": "rope", "step": cut, "from": str(rope_from)}), flush=True)
        times["rope_shared"] = time.perf_counter() - t0
        if "drope" in variants:
            state = {k: v.clone() for k, v in model.state_dict().items()}
        if "rope" in variants:
            t0 = time.perf_counter()
            train_steps(model, sampler, recipe, first=cut, last=recipe.steps, total=recipe.steps, lr=recipe.lr,
                        warmup=warmup, log=log, name="rope", probe=probe, optimizer=opt, after_step=keep_snapshot)
            times["rope"] = times["rope_shared"] + time.perf_counter() - t0
            save(model, tokenizer, out / "rope")
        if "drope" in variants:
            t0 = time.perf_counter()
            model.load_state_dict(state)
            drope = to_drope(model, qk_norm="full")
            drope.set_attn_implementation("sdpa")
            recal_warmup = max(1, recipe.recal_steps // 10)
            train_steps(drope, sampler, recipe, first=cut, last=recipe.steps, total=recipe.recal_steps,
                        lr=recipe.recal_lr, warmup=recal_warmup, log=log, name="drope", probe=probe, lr_offset=cut,
                        weight_decay=recipe.recal_weight_decay, beta2=recipe.recal_beta2,
                        schedule=recipe.recal_schedule)
            fits["drope"] = fit(drope, tokenizer, recipe)
            print(json.dumps({"variant": "drope", "temperature": fits["drope"]}), flush=True)
            times["drope"] = times["rope_shared"] + time.perf_counter() - t0
            save(drope, tokenizer, out / "drope")
        del model
    if "nope" in variants:
        t0 = time.perf_counter()
        nope = new_model(recipe, tokenizer, "nope").to(device)
        train_steps(nope, sampler, recipe, first=0, last=recipe.steps, total=recipe.steps, lr=recipe.lr, warmup=warmup,
                    log=log, name="nope", probe=probe)
        fits["nope"] = fit(nope, tokenizer, recipe)
        print(json.dumps({"variant": "nope", "temperature": fits["nope"]}), flush=True)
        times["nope"] = time.perf_counter() - t0
        save(nope, tokenizer, out / "nope")

    import transformers

    manifest = {
        "recipe": asdict(recipe), "recal_steps": recipe.recal_steps, "variants": list(variants),
        "rope_from": None if rope_from is None else str(rope_from),
        "tokens_per_variant": recipe.steps * recipe.batch * recipe.train_length,
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
        "temperature": fits, "log": log,
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "threads": torch.get_num_threads(), "processor": platform.processor(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "command": "drope train-mini " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train-mini"] else None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``drope train-mini`` (``drope.cli`` gives the parser its defaults-showing formatter)."""
    d = Recipe()
    parser.add_argument("--out", required=True, help="output directory (rope/, nope/, drope/, tokenizer/, manifest.json)")
    parser.add_argument("--size", default=d.size, choices=tuple(SIZES), help="model size (tiny: for tests)")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per variant (equal token budgets)")
    parser.add_argument("--batch", type=int, default=d.batch, help="rows of --train-length tokens per step")
    parser.add_argument("--train-length", type=int, default=d.train_length, help="training context L_train in tokens")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of RoPE / NoPE pretraining")
    parser.add_argument("--recal-lr", type=float, default=d.recal_lr, help="peak learning rate of DroPE recalibration")
    parser.add_argument("--recal-fraction", type=float, default=d.recal_fraction,
                        help="fraction of the steps that DroPE spends recalibrating without RoPE")
    parser.add_argument("--recal-weight-decay", type=float, default=d.recal_weight_decay,
                        help="AdamW weight decay of DroPE recalibration")
    parser.add_argument("--recal-beta2", type=float, default=d.recal_beta2, help="Adam beta2 of DroPE recalibration")
    parser.add_argument("--recal-schedule", default=d.recal_schedule, choices=("cosine", "constant"),
                        help="learning-rate schedule of DroPE recalibration after its 10 %% warm-up")
    parser.add_argument("--recal-preset", default=None, choices=("sakana",),
                        help="sakana: SakanaAI's DroPE recalibration settings (lr 3e-4, weight decay 0, beta2 0.999, "
                             "constant after warm-up); overrides the four --recal-* options above")
    parser.add_argument("--answer-weight", type=float, default=d.answer_weight, help="extra loss weight of answer tokens")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    parser.add_argument("--fit-factor", type=int, default=d.fit_factor,
                        help="fit the temperature at this multiple of L_train")
    parser.add_argument("--fit-windows", type=int, default=d.fit_windows, help="held-out prompts for the temperature fit")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="log loss and answer accuracy every N steps")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of rope, nope, drope")
    parser.add_argument("--value-types", default=",".join(d.value_types),
                        help="comma list of the NIAH value types the retrieval rows carry: number, word")
    parser.add_argument("--rope-from", default=None,
                        help="an earlier --out directory with the same RoPE settings: the drope variant (alone) "
                             "starts from its RoPE snapshot at the cut instead of repeating those steps")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads: N, or auto (OMP_NUM_THREADS when set, else the cores not busy now)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of data, initialisation and tokenizer")
    parser.add_argument("--device", default=d.device, help="auto (CUDA when available), cpu, cuda, cuda:N")


def run(args: argparse.Namespace) -> int:
    """Train the variants and print where they are.

    Returns:
        0 on success, 2 on bad input.
    """
    from ..niah import choose_threads

    try:
        threads = choose_threads(args.threads)
        recal = dict(recal_lr=args.recal_lr, recal_weight_decay=args.recal_weight_decay, recal_beta2=args.recal_beta2,
                     recal_schedule=args.recal_schedule)
        if args.recal_preset == "sakana":
            recal = dict(recal_lr=3e-4, recal_weight_decay=0.0, recal_beta2=0.999, recal_schedule="constant")
        recipe = Recipe(size=args.size, train_length=args.train_length, steps=args.steps, batch=args.batch, lr=args.lr,
                        recal_fraction=args.recal_fraction, answer_weight=args.answer_weight, **recal,
                        vocab_size=args.vocab_size, seed=args.seed, fit_factor=args.fit_factor,
                        fit_windows=args.fit_windows, eval_every=args.eval_every, threads=threads,
                        device=args.device, value_types=[v.strip() for v in args.value_types.split(",") if v.strip()])
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        manifest = train_all(recipe, Path(args.out), variants,
                             rope_from=None if args.rope_from is None else Path(args.rope_from))
    except ValueError as e:
        print(f"drope train-mini: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(Path(args.out) / v) for v in manifest['variants'])} "
          f"in {manifest['total_wall_time_s']:.0f} s")
    return 0
