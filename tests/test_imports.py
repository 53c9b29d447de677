"""What each import pulls in, checked in a fresh interpreter: the kernels and the reference never import
transformers; ``import drope`` alone still registers everything Hugging Face users need."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter with this checkout first on the path; return its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("module", ["drope.kernels", "drope.reference"])
def test_kernels_and_reference_never_import_transformers(module):
    out = run_fresh(f"""
        import sys
        import {module}
        import drope
        drope.kernels.attention, drope.reference.attention
        print(sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers.")))
    """)
    assert out.strip() == "[]"


def test_kernels_launch_without_the_inspector():
    """The compile inspector is a tool beside the kernels: importing and running them never imports it."""
    out = run_fresh("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import drope.kernels
        q = torch.randn(1, 2, 8, 16)
        drope.kernels.attention(q, q, q)
        print(sorted(m for m in sys.modules if m.startswith("drope.inspect")))
    """)
    assert out.strip() == "[]"


def test_import_drope_and_its_cli_load_neither_torch_nor_transformers():
    out = run_fresh("""
        import sys
        import drope, drope.cli
        print("torch" in sys.modules, "transformers" in sys.modules, drope.__version__)
    """)
    assert out.split() == ["False", "False", "0.1.0"]


REGISTERED = """
    from transformers import AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    names = []
    for model_type in ("llama_drope", "qwen2_drope", "qwen3_drope"):
        config = AutoConfig.for_model(model_type)
        names += [type(config).__name__, AutoModel._model_mapping[type(config)].__name__,
                  AutoModelForCausalLM._model_mapping[type(config)].__name__]
    implementations = ("drope_triton", "drope_cp")  # drope's kernels; context parallelism
    print(all(n in ALL_ATTENTION_FUNCTIONS for n in implementations),
          all(n in AttentionMaskInterface._global_mapping for n in implementations), " ".join(names))
"""
EXPECTED = ("True True LlamaDropeConfig LlamaDropeModel LlamaDropeForCausalLM Qwen2DropeConfig Qwen2DropeModel "
            "Qwen2DropeForCausalLM Qwen3DropeConfig Qwen3DropeModel Qwen3DropeForCausalLM")


@pytest.mark.parametrize("first", ["drope", "transformers", "drope.hf.modeling"],
                         ids=["drope-then-transformers", "transformers-then-drope", "a-drope.hf-module-first"])
def test_import_drope_registers_with_transformers(first):
    out = run_fresh(f"import {first}\nimport drope\n" + textwrap.dedent(REGISTERED))
    assert out.strip() == EXPECTED


def test_from_pretrained_of_a_drope_checkpoint_after_only_import_drope(tmp_path):
    from hf_tiny import drope_model

    model = drope_model("llama", qk_norm="full")
    model.save_pretrained(tmp_path)
    total = sum(p.double().sum().item() for p in model.state_dict().values())
    out = run_fresh(f"""
        import drope
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        attn = model.model.layers[0].self_attn
        total = sum(p.double().sum().item() for p in model.state_dict().values())
        print(type(model).__name__, model.config.attention_type, tuple(attn.q_norm.weight.shape),
              tuple(attn.k_norm.weight.shape), repr(total))
    """)
    words = out.split()
    assert words[0] == "LlamaDropeForCausalLM" and words[1] == "qk_norm_nope"
    assert " ".join(words[2:4]) == "(64,) (32,)"  # (Hq*D,) and (Hkv*D,): SakanaAI's all-heads norm
    assert float(words[4]) == pytest.approx(total, rel=1e-12)
