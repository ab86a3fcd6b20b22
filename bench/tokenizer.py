"""Tokenizer encode speed on a 3.5M-token document: tokenizing the input must not be the bottleneck.

Two tokenizers, both trained here in a few seconds on text from tasks.py (vocab ~2000):
  sentencepiece   tokenizer.train_sentencepiece, the project's tiny default
  tokenizer.json  a byte-level BPE trained with the optional `tokenizers` package (the backend of
                  Qwen/Llama-3 checkpoints); skipped with a note if the package is missing
and for each, three ways to turn the same document into ids:
  one string      tokenizer.encode(whole text): what a naive pipeline does
  pieces          memory_agent.document_tokens over the document's pieces, with its per-piece cache
                  (what the memory agent does: the document is never one string)
  pieces, no cache  tokenizer.encode on every piece: what the cache saves
Each reports tokens/s and seconds per 3.5M tokens, and whether the ids equal the one-string ids.

  python bench/tokenizer.py                        # about a minute on 2 cores
  python bench/tokenizer.py --task fwe --length 1m
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from memory_agent import document_tokens  # noqa: E402
from tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402

PER = 3.5 * 2**20  # "seconds per 3.5M tokens" uses the same 3.5M as tasks.parse_length("3.5m")


class ByteCounter:
    """One token per UTF-8 byte: only to generate training text before any tokenizer exists."""

    def encode(self, text):
        return list(text.encode())


def training_text(num_lines=20000):
    """Lines from every synthetic task (fillers, needles, questions): the text the tiny models read."""
    lines = []
    for task in sorted(set(tasks.TASKS) - set(tasks.RULER_NIAH)):  # RULER's variants: some need a file
        for s in tasks.make_samples(task, 20000, ByteCounter(), num=2, seed=1):
            lines.append(s.question)
            lines += [p.strip() for p in tasks.document_pieces(s)]
    return [line for line in lines if line][:num_lines]


def train_hf_bpe(lines, vocab_size, path):
    """A byte-level BPE tokenizer.json, the format of Qwen2.5's and Llama-3's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    tok.save(path)
    return load_tokenizer(path)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(name, tok, sample):
    text_s, text = timed(lambda: tasks.document_text(sample))
    whole_s, whole = timed(lambda: tok.encode(text))
    cached_s, cached = timed(lambda: [i for ids in document_tokens(sample.document, tok) for i in ids])
    plain_s, plain = timed(lambda: [i for p in tasks.document_pieces(sample) for i in tok.encode(p)])
    n = len(whole)
    print(f"\n{name}: {n:,} tokens ({len(text) / 1e6:.1f}M characters; building the string: {text_s:.2f}s)")
    print(f"  {'method':<30} {'tokens/s':>12} {'s per 3.5M':>10}  ids equal one string")
    for label, secs, ids in (("one string", whole_s, whole),
                             ("pieces, cached (memory agent)", cached_s, cached),
                             ("pieces, no cache", plain_s, plain)):
        print(f"  {label:<30} {len(ids) / secs:>12,.0f} {secs * PER / len(ids):>10.2f}  {ids == whole}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="niah_single_words", choices=sorted(set(tasks.TASKS) - tasks.SOURCED))
    ap.add_argument("--length", default="3.5m", help="document length in tokens of the sentencepiece model")
    ap.add_argument("--vocab", type=int, default=2000)
    args = ap.parse_args()

    lines = training_text()
    with tempfile.TemporaryDirectory() as tmp:
        t, sp = timed(lambda: train_sentencepiece(lines, args.vocab, os.path.join(tmp, "tokenizer.model")))
        print(f"sentencepiece BPE, vocab {args.vocab}: trained on {len(lines)} lines in {t:.2f}s")
        # the document is fitted to the sentencepiece model's counts; the other tokenizer reads the same text
        t, sample = timed(lambda: tasks.make_samples(args.task, args.length, sp, num=1)[0])
        pieces = list(tasks.document_pieces(sample))
        print(f"document: {args.task}, {args.length} tokens ({sample.meta['doc_tokens']:,}), built in {t:.1f}s; "
              f"{len(pieces):,} pieces, {len(set(pieces)):,} distinct (what the per-piece cache exploits)")
        del pieces
        bench("sentencepiece", sp, sample)
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            print("\ntokenizer.json: skipped (the optional `tokenizers` package is not installed)")
            return
        path = os.path.join(tmp, "tokenizer.json")
        t, hf = timed(lambda: train_hf_bpe(lines, args.vocab, path))
        print(f"\ntokenizer.json byte-level BPE, vocab {args.vocab}: trained in {t:.2f}s")
        bench("tokenizer.json", hf, sample)


if __name__ == "__main__":
    main()
