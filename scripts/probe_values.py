"""Teacher-forced retrieval probe of local models: is the value token right, by value type?

    python scripts/probe_values.py LENGTH MODEL [MODEL ...]

For each model, 24 held-out NIAH prompts of LENGTH tokens (single and multikey, 12 depths each, seed
12345, disjoint from the demo's seed 0 and from training) are followed by their true answer; a prompt
counts when the argmax at the first value token is right ("first") and when every value token is
("whole"). Prints one line per model and value type. It separates finding the needle (first) from
copying a multi-token value (whole), which greedy NIAH accuracy does not. The tokenizer of the first
model serves all of them (the mini models share one).
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drope.demo.corpus import answer_text
from drope.niah.tasks import PromptBuilder


def main(argv):
    if len(argv) < 2 or not argv[0].isdigit():
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    length, paths = int(argv[0]), argv[1:]
    tok = AutoTokenizer.from_pretrained(paths[0])
    for path in paths:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        cells = []
        for value_type in ("number", "word"):
            builder = PromptBuilder(tok, chat_template="off", value_type=value_type)
            first = whole = n = 0
            for task in ("single", "multikey"):
                for i in range(12):
                    s = builder.build(task, length, i / 11, seed=12345, trial=i)
                    ans = tok(answer_text(s.answers), add_special_tokens=False)["input_ids"]
                    with torch.no_grad():
                        logits = model(input_ids=torch.tensor([s.input_ids + ans])).logits[0]
                    pred = logits[len(s.input_ids) - 1:-1].argmax(-1).tolist()
                    values = [j for j, t in enumerate(ans) if tok.decode([t]).strip() not in (".", ",", "")]
                    first += pred[values[0]] == ans[values[0]]
                    whole += all(pred[j] == ans[j] for j in values)
                    n += 1
            cells.append(f"{value_type}: first {first}/{n} whole {whole}/{n}")
        print(path, " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
