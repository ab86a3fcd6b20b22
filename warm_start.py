"""The embedded agent's supervised warm start (train.py --algo sft): what a model trained from scratch
learns from before RL.

    teacher_rows   a synthetic sample's ideal memory trace as SFT rows: after each chunk, the relevant
                   needle sentences read so far; then the boxed answer from that memory
    copy_rows      repeated random token strings: a transformer learns to copy (induction heads) fastest
                   from text that repeats itself, and every turn of the agent copies
    sft_rows       one SFT step's rows: copy rows during data.copy_warmup_steps, then teacher rows
    tiny_corpus    the text a from-scratch tokenizer is trained on
"""
import math

import numpy as np

import dapo
import tasks
from memory_agent import TEMPLATES, ChunkStream, MemoryAgent, document_tokens

COPY_ROW_TOKENS = 128  # tokens predicted by one copy-warm-up row (it holds one more, the first input)


def sft_rows(cfg, tok, step, rank, next_questions):
    """One SFT step's rows on this rank: a micro-batch of copy rows during data.copy_warmup_steps, then the
    teacher rows of its share of the step's questions (next_questions(k) -> [(index in the run, sample)])."""
    if step < cfg.data.copy_warmup_steps:
        num = max(1, cfg.optim.micro_batch_tokens // (COPY_ROW_TOKENS + 1))
        return copy_rows(num, COPY_ROW_TOKENS, tok.vocab_size, seed=[cfg.seed, step, rank],
                         first_text_id=max(tok.special.values(), default=-1) + 1)
    agent = MemoryAgent(None, tok, cfg.agent)
    return [r for _, s in next_questions(cfg.data.questions_per_step)
            for r in teacher_rows(s, agent, tok, cfg.data.sft_direct)]


def teacher_rows(sample, agent, tok, direct=False):
    """SFT rows for one synthetic sample: after each chunk the ideal memory is the relevant needle
    sentences read so far; the final turn answers from it in \\boxed{}. [] if a needle straddles chunks.
    With `direct`, one more row answers from the whole document in one prompt."""
    if not sample.meta.get("needles"):
        raise ValueError(f"sample {sample.id}: SFT needs a task with needles (task {sample.meta.get('task')})")
    C = agent.cfg.chunk_tokens
    if any(n["relevant"] and n["offset"] // C != (n["offset"] + n["tokens"] - 1) // C for n in sample.meta["needles"]):
        return []  # a needle cut by a chunk boundary: no memory could hold it whole, so no ideal trace
    problem = tok.encode(sample.question)
    stream = ChunkStream(document_tokens(sample.document, tok), C, 1)
    end, rows, memory = [tok.end_of_turn_id], [], None
    for kept in tasks.ideal_memory_trace(sample, C):
        chunk = stream.next(0)
        target = tok.encode(" ".join(kept))
        rows.append(dapo.Row(agent.prompt(problem, memory, chunk), target + end))
        memory = target
    answer = tok.encode("\\boxed{" + ", ".join(sample.answers) + "}")
    rows.append(dapo.Row(agent.prompt(problem, memory), answer + end))
    if direct:
        rows.append(dapo.Row(agent.direct_prompt(sample, max_prompt_tokens=math.inf), answer + end))
    return rows


def copy_rows(num, length, vocab_size, seed, first_text_id=4):
    """`num` rows of next-token prediction on random token strings (6..20 ids of ordinary text,
    >= first_text_id) repeated end to end. Every turn of the memory agent copies (needle into
    memory, memory into memory, memory into answer), and a transformer learns to copy (induction
    heads) fastest from text that repeats itself (results/tiny.md: the copy warm-up)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num):
        piece = rng.integers(first_text_id, vocab_size, size=int(rng.integers(6, 21)))
        seq = np.tile(piece, length // len(piece) + 2)[:length + 1].tolist()
        rows.append(dapo.Row(seq[:1], seq[1:]))
    return rows


# the tasks whose text trains a from-scratch tokenizer: fixed, so that adding a task to tasks.TASKS
# does not change the tokenizer (and every checkpoint) a config rebuilds
TOKENIZER_TASKS = ("fwe", "niah_multikey", "niah_multiquery", "niah_multivalue", "niah_single", "niah_single_words",
                   "passkey", "vt")


def tiny_corpus(num=400, names=TOKENIZER_TASKS):
    """Text for the tiny tokenizer: the synthetic tasks' documents and questions, the templates."""
    class Words:  # counts by whitespace, enough to size documents for tokenizer training
        def encode(self, text):
            return text.split()

    out = [t for tmpl in TEMPLATES.values() for t in tmpl.values()]
    for i in range(num):
        name = names[i % len(names)]
        s = tasks.TASKS[name](600, Words(), seed=12345, index=i)
        out += [s.question, "".join(tasks.document_pieces(s)), "\\boxed{" + ", ".join(s.answers) + "}"]
    return out
