"""Where a memory agent departs from the ideal trace: teacher-forced errors at word starts vs inside words.

Feeds each row of warm_start.teacher_rows (every memory update and the final answer, with the ideal
memory as input) through the model and compares its greedy next token with the trace's, for each
target token. A token is "inside" a word when it and the token before it both join letters or
digits ("X" after " M" in " MX"); otherwise it starts one (" M" after "VAR", "T" after "{").
Copying the rest of a word is what induction heads do; choosing which word comes next is not.

    python bench/teacher_forcing.py --model checkpoints/multihop-sft --tasks niah_multikey,vt,two_hop

Meaningful for a model trained to follow the trace (SFT); after RL the policy may choose another
wording of a right answer, which counts as an error here.
"""
import argparse
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from memory_agent import AgentConfig, MemoryAgent  # noqa: E402
from model import build_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from warm_start import teacher_rows  # noqa: E402


def count_errors(model, tok, agent, sample, counts):
    rows = teacher_rows(sample, agent, tok)
    for i, row in enumerate(rows):
        kind = "answer" if i == len(rows) - 1 else "memory"
        ids = torch.tensor([row.prompt_ids + row.response_ids])
        with torch.no_grad():
            guess = model(ids)[0, len(row.prompt_ids) - 1:-1].argmax(-1).tolist()  # (len(response),)
        before = ""
        for g, t in zip(guess, row.response_ids):
            text = tok.decode([t])
            where = "inside" if before[-1:].isalnum() and text[:1].isalnum() else "start"
            counts[kind, where, "n"] += 1
            counts[kind, where, "wrong"] += g != t
            before = text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="niah_multikey,vt,two_hop")
    p.add_argument("--length", default="512")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--seed", type=int, default=777)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.model).eval()
    tok = load_tokenizer(args.model)
    agent = MemoryAgent(None, tok, AgentConfig.load(args.model) or AgentConfig())
    print(f"{'task':15} {'turn':7} {'word-start tokens wrong':>26} {'inside-word tokens wrong':>26}")
    for task in args.tasks.split(","):
        counts = Counter()
        for s in tasks.make_samples(task, args.length, tok, args.samples, args.seed):
            count_errors(model, tok, agent, s, counts)
        for kind in ("memory", "answer"):
            cells = [f"{counts[kind, w, 'wrong']}/{counts[kind, w, 'n']} = "
                     f"{100 * counts[kind, w, 'wrong'] / max(counts[kind, w, 'n'], 1):5.1f}%" for w in ("start", "inside")]
            print(f"{task:15} {kind:7} {cells[0]:>26} {cells[1]:>26}")


if __name__ == "__main__":
    main()
