"""Data for the memory agent: RULER-style synthetic tasks fitted to a token length (the project's,
and RULER's as the MemAgent release evaluates them, qa_1 and qa_2 included), the RULER-HotpotQA
multi-document builder, a JSONL loader, and the scorers (the release's training reward and
evaluation frame among them).

A Sample's document is a str or a zero-argument callable returning a fresh iterator of text pieces,
so a 3.5M-token document is never one string. Each piece carries its separator in front (" sentence",
"\n\nDocument 7: ..."; the first piece has none): a BPE tokenizer then sees " word" as in running
text, and the document's ids are the concatenation of tokenizer.encode(piece). Synthetic documents
are fitted so that this count never exceeds the target and falls short by less than one filler
piece (fwe: by less than one step of its word counts).

meta: task, length (target tokens; documents for hotpotqa), scorer (a SCORERS name); synthetic tasks
add doc_tokens (exact) and needles, one {text, offset, tokens, relevant, depth} per needle sentence in
tokens of the generating tokenizer. relevant: an ideal memory keeps it once read (two_hop: until the
needle numbered `until` is read, if any); depth (of the first relevant needle): a fraction of the document.
"""

import json
import math
import os
import random
import re
import string
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cache, partial
from itertools import chain, cycle, islice
from typing import Callable, Iterator, Union

import numpy as np


@dataclass
class Sample:
    """One question over one document; every sample passes this check, whatever made it."""
    id: str
    question: str
    document: Union[str, list, os.PathLike, Callable[[], Iterator[str]]]
    answers: list[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.question, str) and self.question.strip()):
            raise ValueError(f"sample {self.id}: the question must be a non-empty string, got {self.question!r}")
        if not (isinstance(self.answers, list) and all(isinstance(a, str) and a.strip() for a in self.answers)):
            raise ValueError(f"sample {self.id}: answers must be a list of non-empty strings, got {self.answers!r}")


@dataclass(frozen=True)
class TaskSpec:
    """A synthetic task: its generator, the shortest length each sample fits in, and what its samples
    promise. tests/test_tasks.py checks every task in TASKS against its own spec, so a new task is its
    generator plus one TASKS entry. Called like its generator."""
    make: Callable[..., Sample]  # (length, tokenizer, seed=0, index=0) -> a Sample of at most `length` tokens
    minimum: Callable[..., int]  # (tokenizer, seed, index) -> the shortest length that sample fits in
    scorer: str  # the SCORERS name in every sample's meta
    needles: int = 0  # needle sentences per document
    relevant: int = 0  # of them, those an ideal memory keeps
    answers_in_needles: bool = True  # each gold string is written in a relevant needle (False: computed)

    def __call__(self, length, tokenizer, seed=0, index=0, source=None) -> Sample:
        """`source`: the text file a task in SOURCED reads its haystack from."""
        return self.make(length, tokenizer, seed, index, source)


def document_pieces(sample: Sample) -> Iterator[str]:
    doc = sample.document
    return iter([doc]) if isinstance(doc, str) else doc()


def document_text(sample: Sample) -> str:
    return "".join(document_pieces(sample))


def parse_length(length: Union[int, str]) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '3.5m' -> int(3.5 * 2**20); plain ints pass through."""
    if isinstance(length, int) and not isinstance(length, bool):
        n = length
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([km]?)\s*", str(length).lower())
        if m is None:
            raise ValueError(f"bad length {length!r}: expected e.g. 8192, '8k', '128k', '3.5m'")
        if "." in m[1] and not m[2]:
            raise ValueError(f"bad length {length!r}: a length without k or m is a whole number of tokens")
        n = int(float(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m[2]])
    if n <= 0:
        raise ValueError(f"bad length {length!r}: must be positive")
    return n


# -----------------------------------------------------------------------------
# words the generators are built from (the project's own; none of them is a key word)

NOISE = [
    "The river keeps moving past the old stone mill.",
    "A small boat rests on the sand near the dock.",
    "Wind brushes the tall grass along the hill.",
    "The baker warms the oven before the town wakes up.",
    "Clouds drift slowly over the quiet fields.",
    "A dog naps in the shade beside the gate.",
    "Someone hums a tune while sweeping the porch.",
    "The lamp in the window glows until morning.",
]
ADJECTIVES = ("amber bold brisk calm clever crisp dusty eager faint fancy gentle golden hollow "
              "humble icy jolly lively lucky misty narrow noble plain proud rapid rusty shiny "
              "silent steady sunny tidy wild brave").split()
NOUNS = ("anchor badger basket beacon bucket candle canyon cellar comet falcon fiddle garden "
         "harbor helmet island kettle ladder lantern meadow mirror orchard pebble pillow rocket "
         "saddle signal thistle tunnel valley wagon willow zipper").split()
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
# two_hop: short names and places, a token or two each for a 2K-word tokenizer
PEOPLE = ("Ada Bo Cy Dee Eli Fay Gus Hal Ida Jo Kai Liv Max Ned Oz Pam Ray Sue Tom Uma Vic Wes "
          "Yan Zoe").split()
PLACES = "Lima Oslo Rome Kyiv Baku Doha Riga Bern Cairo Delhi Dakar Hanoi Paris Quito Sofia Tunis".split()
RELATIONS = "mentor friend boss cousin tutor partner".split()
SEP = " "


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    # the target length is not part of the seed: sample i asks the same question at every length
    return np.random.default_rng([zlib.crc32(task.encode()), seed, index])


def _spell(code: int, syllables: int) -> str:
    return "".join(SYLLABLES[code // len(SYLLABLES) ** j % len(SYLLABLES)] for j in range(syllables))


def _numbers(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    low = 10 ** (digits - 1)
    return [str(low + int(x)) for x in rng.choice(9 * low, size=n, replace=False)]


def _token_counter(tokenizer) -> Callable[[str], int]:
    # filler repeats a few hundred distinct pieces at most: encode each once
    return cache(lambda piece: len(tokenizer.encode(piece)))


# -----------------------------------------------------------------------------
# haystacks: zero-argument callables returning an endless, deterministic stream of pieces

def _noise_haystack(rng: np.random.Generator) -> Callable[[], Iterator[str]]:
    # a seeded first sentence puts the 8-sentence cycle at every phase against the chunk
    # boundaries, so short training documents do not repeat a few exact chunks that a small
    # model could memorise in place of the rule "no needle here, keep the memory"
    start = int(rng.integers(len(NOISE)))
    spaced = [SEP + s for s in NOISE]
    return lambda: chain([NOISE[start]], islice(cycle(spaced), start + 1, None))


def _word_haystack(rng: np.random.Generator) -> Callable[[], Iterator[str]]:
    # a pool of generated lines drawn at random: reads as random words, yet a 3.5M-token
    # document has only a few hundred distinct pieces to encode when fitting its length
    pool = []
    for _ in range(256):
        words = [_spell(int(rng.integers(len(SYLLABLES) ** 3)), int(rng.integers(1, 4)))
                 for _ in range(int(rng.integers(8, 13)))]
        pool.append(" ".join(words).capitalize() + ".")
    spaced = [SEP + s for s in pool]
    seed = int(rng.integers(2 ** 63))

    def stream():
        r = np.random.default_rng(seed)
        yield pool[int(r.integers(len(pool)))]
        while True:
            yield from (spaced[j] for j in r.integers(len(pool), size=4096).tolist())
    return stream


# -----------------------------------------------------------------------------
# needle tasks: a draw (seed, index) -> the question, its needles and haystack, independent of
# the length; _needle_sample then fits them to a token length

def _too_short(task, target, minimum) -> ValueError:
    return ValueError(f"{task}: length {target} is too short; its samples need at least {minimum} "
                      f"tokens with this tokenizer")


def _needle_minimum(count, needles, haystack) -> int:
    # the needles and one filler piece: every needle sits after a filler piece
    return sum(count(SEP + s) for s in needles) + count(next(haystack()))


def _needle_sample(task, length, tokenizer, seed, index, rng, haystack, needles, relevant,
                   question, answers, scorer, ordered=False, until=None) -> Sample:
    """Place `needles` at seeded uniform depths in `haystack`, fitted to `length` tokens. Needles sit
    after filler piece k, k in 1..n, so the document opens with filler and every piece's token count
    is known before placement: the fit is exact. `ordered` keeps them in list order (a chain)."""
    target = parse_length(length)
    count = _token_counter(tokenizer)
    minimum = _needle_minimum(count, needles, haystack)
    if target < minimum:
        raise _too_short(task, target, minimum)
    needle_tokens = [count(SEP + s) for s in needles]
    budget = target - sum(needle_tokens)
    cum = [0]  # cum[i] = tokens of the first i filler pieces
    for piece in haystack():
        c = count(piece)
        if cum[-1] + c > budget:
            break
        cum.append(cum[-1] + c)
    n = len(cum) - 1
    depths = rng.random(len(needles))
    if ordered:
        depths.sort()
    slots = [1 + int(d * n) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (slots[j], j))
    total = cum[n] + sum(needle_tokens)
    records, before = [None] * len(needles), 0
    for j in order:
        offset = cum[slots[j]] + before
        before += needle_tokens[j]
        records[j] = dict(text=needles[j], offset=offset, tokens=needle_tokens[j],
                          relevant=relevant[j], depth=offset / total)
        if until is not None and until[j] is not None:
            records[j]["until"] = until[j]
    placed = [(slots[j], SEP + needles[j]) for j in order]

    def pieces():
        s = 0
        for i, piece in enumerate(islice(haystack(), n)):
            yield piece
            while s < len(placed) and placed[s][0] == i + 1:
                yield placed[s][1]
                s += 1

    meta = dict(task=task, length=target, scorer=scorer, doc_tokens=total,
                depth=next(r["depth"] for r in records if r["relevant"]), needles=records,
                seed=seed, index=index)
    return Sample(f"{task}-{target}-{seed}-{index}", question, pieces, answers, meta)


def _vt(seed, index) -> dict:
    rng = _rng("vt", seed, index)
    value = _numbers(rng, 1, 5)[0]
    names = ["".join(chr(65 + int(p) // 26 ** j % 26) for j in range(5))
             for p in rng.choice(26 ** 5, size=5, replace=False)]
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return dict(rng=rng, haystack=_noise_haystack(rng), needles=needles, relevant=[True] * 5,
                question=f"Which variables end up holding the value {value}?", answers=names, ordered=True)


def _passkey(seed, index) -> dict:
    rng = _rng("passkey", seed, index)
    key = _numbers(rng, 1, 5)[0]
    return dict(rng=rng, haystack=_noise_haystack(rng), needles=[f"The pass key is {key}."],
                relevant=[True], question="What is the pass key?", answers=[key])


# two_hop's facts as (person, relation, relative) indices into the drawn people and relations:
# the asked link first, then links whose relatives also get a workplace (same person or same
# relation as the asked one: following the wrong link gives a wrong place), then links leading nowhere
_LINKS = [(0, 0, 1), (0, 1, 2), (3, 0, 4), (5, 2, 6), (0, 2, 7), (8, 0, 9), (10, 1, 11)]
_WORKERS = [1, 2, 4, 6]  # people with a workplace fact, the bridge first


def _two_hop(seed, index) -> dict:
    """HotpotQA-like bridge question: "The mentor of Ada is Bo." and "Bo works in Lima." answer
    "Where does the mentor of Ada work?". All names and places differ, so the asked chain has one
    answer and no distractor fact names it. The relevant needles are those an ideal memory ever
    keeps: the asked link, the bridge's workplace, and every other workplace fact while the asked
    link is unread (until then any name may be the bridge)."""
    rng = _rng("two_hop", seed, index)
    people = [PEOPLE[i] for i in rng.choice(len(PEOPLE), size=12, replace=False)]
    places = [PLACES[i] for i in rng.choice(len(PLACES), size=len(_WORKERS), replace=False)]
    rels = [RELATIONS[i] for i in rng.choice(len(RELATIONS), size=3, replace=False)]
    needles = ([f"The {rels[r]} of {people[p]} is {people[o]}." for p, r, o in _LINKS]
               + [f"{people[w]} works in {place}." for w, place in zip(_WORKERS, places)])
    relevant = [True] + [False] * (len(_LINKS) - 1) + [True] * len(_WORKERS)
    until = [None] * (len(_LINKS) + 1) + [0] * (len(_WORKERS) - 1)  # dropped once link 0 is read
    return dict(rng=rng, haystack=_noise_haystack(rng), needles=needles, relevant=relevant,
                question=f"Where does the {rels[0]} of {people[0]} work?", answers=places[:1], until=until)


def needle_task(task, draw, scorer="string_match_all", **promises) -> TaskSpec:
    """The TaskSpec of a needle task from its draw: (seed, index) -> dict(rng, haystack, needles,
    relevant, question, answers[, ordered, until]), whose needles are placed at seeded depths of the
    haystack and fitted to the length."""
    def make(length, tokenizer, seed=0, index=0, source=None):
        return _needle_sample(task, length, tokenizer, seed, index, scorer=scorer, **_draw(draw, seed, index, source))

    def minimum(tokenizer, seed, index, source=None):
        d = _draw(draw, seed, index, source)
        return _needle_minimum(_token_counter(tokenizer), d["needles"], d["haystack"])
    return TaskSpec(make, minimum, scorer, **promises)


def _draw(draw, seed, index, source):  # a task that reads its haystack from a file gets it as `essay`
    return draw(seed, index) if source is None else draw(seed, index, essay=source)

# -----------------------------------------------------------------------------
# the needle-in-a-haystack family: `keys` keys with `values` values each, `asked` keys asked, keys and
# values of RULER's formats (words, 7-digit numbers, uuids) on one of four haystacks: "noise" (the
# repeated sentences above, the project's stand-in for RULER's repeated lines), "words" (generated
# random words), "essay" (the sentences of a text file the user gives, cycled when the document is
# longer; RULER uses Paul Graham's essays) and "needles" (other keys' needles, as distractors). The
# needle and question wording is the project's. NIAH holds the project's tasks, RULER_NIAH RULER's as
# the release evaluates them (its synthetic.yaml); RULER's niah_multivalue and niah_multiquery are the
# project's tasks of those names on an essay haystack, here niah_multivalue_essay and niah_multiquery_essay.

def _distinct(rng, kind, n) -> list[str]:
    """n distinct keys or values: adjective-noun words, 7-digit numbers or uuids."""
    if kind == "words":
        picks = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
        return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in picks]
    if kind == "numbers":
        return _numbers(rng, n, 7)
    return [str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4)) for _ in range(n)]


def _essay_haystack(path) -> Callable[[], Iterator[str]]:
    sentences = _essay_sentences(str(path))
    spaced = [SEP + x for x in sentences]
    return lambda: chain(sentences[:1], spaced[1:], cycle(spaced))


@cache
def _essay_sentences(path) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = " ".join(f.read().split())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the essay haystack ({e})") from e
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", text) if x]
    if not sentences:
        raise ValueError(f"{path}: the essay haystack holds no text")
    return sentences


def _needles_haystack(rng, key, value, asked) -> Callable[[], Iterator[str]]:
    seed = int(rng.integers(2 ** 63))

    def stream():
        r = np.random.default_rng(seed)
        first = True
        while True:
            k, v = _distinct(r, key, 1)[0], _distinct(r, value, 1)[0]
            if k not in asked:
                yield ("" if first else SEP) + f"One of the magic {value} for {k} is {v}."
                first = False
    return stream


def _niah(task, seed, index, haystack="noise", key="words", value="numbers", keys=1, values=1, asked=1,
          essay=None) -> dict:
    if haystack == "essay" and essay is None:
        raise ValueError(f"{task} reads its haystack from a text file: give it as {task}:FILE")
    rng = _rng(task, seed, index)
    names, vals = _distinct(rng, key, keys), _distinct(rng, value, keys * values)
    needles = [f"One of the magic {value} for {names[i // values]} is {v}." for i, v in enumerate(vals)]
    question = (f"What are the magic {value} for {', '.join(names[:asked - 1])} and {names[asked - 1]}?"
                if asked > 1 else f"What are all the magic {value} for {names[0]}?" if values > 1
                else f"What is the magic {value[:-1]} for {names[0]}?")
    stack = (_noise_haystack(rng) if haystack == "noise" else _word_haystack(rng) if haystack == "words"
             else _essay_haystack(essay) if haystack == "essay" else _needles_haystack(rng, key, value, set(names)))
    return dict(rng=rng, haystack=stack, needles=needles, relevant=[i // values < asked for i in range(len(vals))],
                question=question, answers=vals[:asked * values])


NIAH = dict(niah_single={}, niah_single_words=dict(haystack="words"), niah_multikey=dict(keys=4),
            niah_multivalue=dict(values=4), niah_multiquery=dict(keys=4, asked=4))
RULER_NIAH = dict(niah_single_1=dict(haystack="noise"),
                  niah_single_2=dict(haystack="essay"),
                  niah_single_3=dict(haystack="essay", value="uuids"),
                  niah_multikey_1=dict(haystack="essay", keys=4),
                  niah_multikey_2=dict(haystack="needles"),
                  niah_multikey_3=dict(haystack="needles", key="uuids", value="uuids"),
                  niah_multivalue_essay=dict(haystack="essay", values=4),
                  niah_multiquery_essay=dict(haystack="essay", keys=4, asked=4))
SOURCED = {name for name, kw in RULER_NIAH.items() if kw["haystack"] == "essay"}  # tasks that read a file


# -----------------------------------------------------------------------------
# fwe: word k of the vocabulary appears about N / k**2 times (Zipf, alpha 2); rank 1 is "..."
# (noise), ranks 2-4 are the answer

_ZIPF = np.arange(1, 2001, dtype=np.float64) ** -2.0
_ZIPF /= _ZIPF.sum()


def _zipf_counts(n: int) -> np.ndarray:
    return np.floor(n * _ZIPF).astype(np.int64)


def _fwe_words(tokenizer, seed, index):
    rng = _rng("fwe", seed, index)
    codes = rng.choice(len(SYLLABLES) ** 3, size=len(_ZIPF) - 1, replace=False)
    words = ["..."] + [_spell(int(c), 3) for c in codes]
    sep_tokens = np.array([len(tokenizer.encode(SEP + w)) for w in words])
    raw_tokens = np.array([len(tokenizer.encode(w)) for w in words])
    # the first word goes without its separator: leave room for the worst case
    slack = max(0, int((raw_tokens - sep_tokens).max()))
    return rng, words, sep_tokens, raw_tokens, slack


def _fwe_minimum(sep_tokens, slack) -> int:
    # from n = 1 / (p4 - p5) words on, rank 4 always outnumbers rank 5; go down while it still does
    n = math.ceil(1 / (_ZIPF[3] - _ZIPF[4]))
    while n > 1 and _zipf_counts(n - 1)[3] > _zipf_counts(n - 1)[4]:
        n -= 1
    return int(_zipf_counts(n) @ sep_tokens) + slack


def fwe_minimum(tokenizer, seed, index, source=None) -> int:
    _, _, sep_tokens, _, slack = _fwe_words(tokenizer, seed, index)
    return _fwe_minimum(sep_tokens, slack)


def fwe(length, tokenizer, seed=0, index=0, source=None) -> Sample:
    """A length below the minimum is refused even where rounding happens to separate ranks 4 and
    5 there: every length from the minimum up works, none below it."""
    target = parse_length(length)
    rng, words, sep_tokens, raw_tokens, slack = _fwe_words(tokenizer, seed, index)
    minimum = _fwe_minimum(sep_tokens, slack)
    if target < minimum:
        raise _too_short("fwe", target, minimum)
    budget = target - slack
    lo, hi = 0, 2 * (target + len(words))  # tokens(hi) > budget, as every word costs >= 1 token
    while hi - lo > 1:  # largest word count N whose words fit the budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _zipf_counts(mid) @ sep_tokens <= budget else (lo, mid)
    counts = _zipf_counts(lo)
    spaced = [SEP + w for w in words]
    perm_seed = int(rng.integers(2 ** 63))

    def order():
        return np.random.default_rng(perm_seed).permutation(np.repeat(np.arange(len(words)), counts))

    def pieces():
        seq = order()
        yield words[seq[0]]
        for block in range(1, len(seq), 1 << 16):
            yield from (spaced[j] for j in seq[block:block + (1 << 16)].tolist())

    first = int(order()[0])
    total = int(counts @ sep_tokens) - int(sep_tokens[first]) + int(raw_tokens[first])
    meta = dict(task="fwe", length=target, scorer="string_match_all", doc_tokens=total,
                needles=[], seed=seed, index=index)
    question = "Ignoring the dots, which three coded words occur most often in the text?"
    return Sample(f"fwe-{target}-{seed}-{index}", question, pieces, words[1:4], meta)


def _niah_task(name, kw) -> TaskSpec:
    return needle_task(name, partial(_niah, name, **kw), needles=kw.get("keys", 1) * kw.get("values", 1),
                       relevant=kw.get("asked", 1) * kw.get("values", 1))


TASKS = dict(
    **{name: _niah_task(name, kw) for name, kw in NIAH.items()},
    vt=needle_task("vt", _vt, needles=5, relevant=5),
    passkey=needle_task("passkey", _passkey, needles=1, relevant=1),
    two_hop=needle_task("two_hop", _two_hop, scorer="exact_match", needles=11, relevant=5),
    fwe=TaskSpec(fwe, fwe_minimum, "string_match_all", answers_in_needles=False),  # the answers are counted
    **{name: _niah_task(name, kw) for name, kw in RULER_NIAH.items()},
)


def _check_positive(name, n):
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def check_length(task: str, length, tokenizer, num: int = 1, seed: int = 0, source=None) -> int:
    """`length` in tokens if samples 0..num-1 of `task` fit in it, else a ValueError naming the
    task, the length and the minimum. Cheap: draws the needles, builds no document."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    _check_positive("num", num)
    target = parse_length(length)
    minimum = max(TASKS[task].minimum(tokenizer, seed, i, source) for i in range(num))
    if target < minimum:
        raise _too_short(task, target, minimum)
    return target


def make_samples(task: str, length, tokenizer, num: int, seed: int = 0, source=None) -> list[Sample]:
    """`num` samples of a TASKS task fitted to `length`; `source`: the text file a SOURCED task reads."""
    check_length(task, length, tokenizer, num, seed, source)
    return [TASKS[task](length, tokenizer, seed, i, source) for i in range(num)]


def ideal_memory_trace(sample: Sample, chunk_tokens: int) -> list[list[str]]:
    """For each chunk of `chunk_tokens` tokens (of the generating tokenizer), the needles an ideal
    memory holds after it, in document order: the relevant needles whose last token is read, less
    those whose `until` needle is read. two_hop: a workplace fact may go only once the asked link
    shows its subject is not the bridge; dropping it earlier because its subject is someone else's
    relative would assume nobody has two relatives, which a mentor or a friend can have."""
    needles = sample.meta["needles"]
    ends = [r["offset"] + r["tokens"] for r in needles]
    kept = sorted((e, j) for j, (e, r) in enumerate(zip(ends, needles)) if r["relevant"])
    trace = []
    for c in range(-(-sample.meta["doc_tokens"] // chunk_tokens)):
        read = (c + 1) * chunk_tokens
        trace.append([needles[j]["text"] for e, j in kept
                      if e <= read and not ("until" in needles[j] and ends[needles[j]["until"]] <= read)])
    return trace


# -----------------------------------------------------------------------------
# HotpotQA (the MemAgent release's RULER-HotpotQA construction) and JSONL files

def read_records(path) -> list:
    """[(where, item)] of a JSON list (the official HotpotQA file; where is "FILE[i]"), a JSON object
    (SQuAD's file, one item) or a JSONL file (a filtered copy, one item per line, blank lines skipped;
    where is "FILE:LINE"): the one reader of record files, whose errors name the file and the line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8-sig")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    whole = None
    try:
        whole = json.loads(text)
    except RecursionError as e:  # [[[[... nested
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    except ValueError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}: malformed JSON ({str(e)[:200]})") from None
    if isinstance(whole, list):
        return [(f"{path}[{i}]", item) for i, item in enumerate(whole)]
    if isinstance(whole, dict) and "\n" in text.strip():  # one object on one line is a JSONL file
        return [(str(path), whole)]
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        try:
            records += [(f"{path}:{n}", json.loads(line))] if line.strip() else []
        except (ValueError, RecursionError) as e:  # malformed, a 5000-digit number, [[[[... nested
            raise ValueError(f"{path}:{n}: malformed JSON ({getattr(e, 'msg', str(e)[:100])})") from None
    return records


def check_fields(where, record, kinds):
    """`record` is a JSON object holding each key of `kinds` with a value of that type (bool is no int)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key, kind in kinds.items():
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r}")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{where}: field {key!r} should be a {names}")


def _check_hotpot_item(where, item):
    check_fields(where, item, dict(_id=str, question=str, answer=str, supporting_facts=list, context=list))
    for para in item["context"]:
        if not (isinstance(para, list) and len(para) == 2 and isinstance(para[0], str)
                and isinstance(para[1], list) and all(isinstance(s, str) for s in para[1])):
            raise ValueError(f"{where}: field 'context' should hold [title, [sentences]] pairs")
    if not item["context"] or not item["supporting_facts"]:
        raise ValueError(f"{where}: an empty 'context' or 'supporting_facts': its own paragraphs are what the "
                         "question is about")
    titles = {title for title, _ in item["context"]}
    if len(titles) < len(item["context"]):
        raise ValueError(f"{where}: two paragraphs with one title; a title names one paragraph")
    for fact in item["supporting_facts"]:
        if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str)
                and isinstance(fact[1], int) and not isinstance(fact[1], bool)):
            raise ValueError(f"{where}: field 'supporting_facts' should hold [title, index] pairs")
        if fact[0] not in titles:
            raise ValueError(f"{where}: supporting title {fact[0]!r} is not in its context")


def hotpot_questions(path) -> list:
    """The checked items of a HotpotQA file, [(where, item)]."""
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: expected a non-empty list of HotpotQA items")
    for where, item in records:
        _check_hotpot_item(where, item)
    return records


def load_hotpotqa(path, num_docs: int, num_samples=None, seed: int = 0,
                  context: str = "release") -> list[Sample]:
    """HotpotQA questions over `num_docs` documents each, from the dev-distractor layout (a JSON
    list, or JSONL: one item per line); with num_samples, the file's first num_samples questions (the
    release evaluates the first 128 it keeps). context="release" (the MemAgent release) starts from
    all of the question's own paragraphs (2 gold, 8 distractors retrieved for it); "supporting" from
    its gold paragraphs only. Paragraphs of the file with other titles (other questions' for
    "release") fill up to num_docs, drawn for each question and each num_docs apart (seeded). As in
    the release, one fixed shuffle of num_docs slots (random.Random(4)) places them: a question's own
    paragraphs come first in the list it shuffles, so at a given num_docs they sit in the same slots
    for every question with as many paragraphs. Each is formatted "Document i:\\n{title}\\n{text}"
    (i from 1), joined by blank lines. A num_docs below a question's own paragraph count is an error,
    not a truncation."""
    if context not in ("release", "supporting"):
        raise ValueError(f"context must be 'release' or 'supporting', got {context!r}")
    _check_positive("num_docs", num_docs)
    if num_samples is not None:
        _check_positive("num_samples", num_samples)
    items = hotpot_questions(path)
    titles, texts, seen = [], [], set()
    for _, item in items:
        for title, sentences in item["context"]:
            if title not in seen:
                seen.add(title)
                titles.append(title)
                texts.append("".join(sentences))  # HotpotQA sentences carry their own spaces
    slots = list(range(num_docs))
    random.Random(4).shuffle(slots)  # the release's placement, the same for every question
    return [_hotpot_sample(i, *items[i], titles, texts, num_docs, seed, context, slots)
            for i in range(min(num_samples or len(items), len(items)))]


def _hotpot_sample(i, where, item, titles, texts, num_docs, seed, context, slots) -> Sample:
    paragraphs = {}
    for title, sentences in item["context"]:
        paragraphs.setdefault(title, sentences)
    gold_titles = list(dict.fromkeys(title for title, _ in item["supporting_facts"]))
    own = [(t, "".join(paragraphs[t])) for t in (gold_titles if context == "supporting" else paragraphs)]
    need = num_docs - len(own)
    if need < 0:
        raise ValueError(f"{where}: {len(own)} paragraphs of its own ({context} context), more than "
                         f"num_docs={num_docs}")
    if len(titles) - len(own) < need:
        raise ValueError(f"{where}: the file's {len(titles)} distinct paragraphs are too few for num_docs="
                         f"{num_docs} ({need} from other questions needed besides its own {len(own)})")
    own_titles = {t for t, _ in own}

    def pieces():
        # drawn when read, not when loaded: building 90K training questions stays instant
        first = np.random.default_rng([seed, num_docs, i]).permutation(len(titles))[:need + len(own)].tolist()
        fill = [j for j in first if titles[j] not in own_titles][:need]  # `first` holds `need` others at least
        for n, k in enumerate(slots):
            title, text = own[k] if k < len(own) else (titles[fill[k - len(own)]], texts[fill[k - len(own)]])
            yield ("\n\n" if n else "") + f"Document {n + 1}:\n{title}\n{text}"

    # the supporting sentences are what an ideal memory keeps; indices past the end are skipped
    supporting = [paragraphs[t][s].strip() for t, s in item["supporting_facts"] if 0 <= s < len(paragraphs[t])]
    meta = dict(task="hotpotqa", length=num_docs, num_docs=num_docs, scorer="sub_em", context=context,
                gold_titles=gold_titles, supporting=supporting, seed=seed, index=i)
    return sample_at(where, item["_id"], item["question"], pieces, [item["answer"]], meta)


# -----------------------------------------------------------------------------
# RULER's qa_1 (SQuAD) and qa_2 (HotpotQA) as the release evaluates them: a question's own
# paragraphs (SQuAD: the one it was asked on; HotpotQA: all of its context), then for SQuAD the other
# paragraphs of its article, then other paragraphs of the file, as many as fit the token length;
# placed by RULER's fixed shuffle of the slots (random.Random(42)), formatted like the HotpotQA
# builder's. Scored by sub_em (answer_is_sub_em in the release's frame: its first gold answer).

RULER_QA = {"qa_1": "SQuAD", "qa_2": "HotpotQA"}


def _squad_questions(path):
    """-> ([(question, answers, own paragraphs, same-article paragraphs)], unique paragraphs, sorted)."""
    items = read_records(path)
    if len(items) != 1 or not isinstance(items[0][1], dict) or not isinstance(items[0][1].get("data"), list):
        raise ValueError(f"{path}: expected SQuAD's layout, an object with a 'data' list of articles")
    data = items[0][1]["data"]
    try:
        articles = [[p["context"] for p in a["paragraphs"]] for a in data]
        docs = sorted({c for paragraphs in articles for c in paragraphs})
        where = {c: j for j, c in enumerate(docs)}
        questions = []
        for article in data:
            same = [where[p["context"]] for p in article["paragraphs"]]
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    if not qa.get("is_impossible", False) and qa["answers"]:
                        questions.append((qa["question"], [a["text"] for a in qa["answers"]], [where[p["context"]]],
                                          [j for j in same if j != where[p["context"]]]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not SQuAD's layout ({type(e).__name__}: {e})") from None
    return questions, docs


def _hotpot_ruler_questions(path):
    docs, own, items = set(), [], [item for _, item in hotpot_questions(path)]
    for item in items:
        own.append([f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]])
        docs.update(own[-1])
    docs = sorted(docs)
    where = {d: j for j, d in enumerate(docs)}
    return [(item["question"], [item["answer"]], list(dict.fromkeys(where[d] for d in paragraphs)), [])
            for item, paragraphs in zip(items, own)], docs


def load_ruler_qa(task, path, length, tokenizer, num, seed=0) -> list[Sample]:
    """The first `num` answerable questions of a SQuAD (qa_1) or HotpotQA (qa_2) file, each over as many
    documents as fit `length` tokens (see RULER_QA above)."""
    if task not in RULER_QA:
        raise ValueError(f"unknown RULER QA task {task!r}; known: {', '.join(RULER_QA)}")
    _check_positive("num", num)
    target = parse_length(length)
    questions, docs = (_squad_questions if task == "qa_1" else _hotpot_ruler_questions)(path)
    if not questions:
        raise ValueError(f"{path}: no answerable {RULER_QA[task]} question")
    count = _token_counter(tokenizer)
    return [_qa_sample(task, i, questions[i], docs, target, count, seed) for i in range(min(num, len(questions)))]


def _qa_sample(task, i, q, docs, target, count, seed) -> Sample:
    question, answers, own, more = q
    rng = np.random.default_rng([zlib.crc32(task.encode()), seed, i])
    taken = set(own) | set(more)
    order = own + [more[j] for j in rng.permutation(len(more))]
    order += [j for j in rng.permutation(len(docs)).tolist()[:target] if j not in taken]  # a doc is >= 1 token

    def pieces(n):
        slots = list(range(n))
        random.Random(42).shuffle(slots)
        return [("\n\n" if k else "") + f"Document {k + 1}:\n{docs[order[j]]}" for k, j in enumerate(slots)]

    unshuffled = lambda k: count(f"\n\nDocument {k + 1}:\n{docs[order[k]]}")  # noqa: E731
    n, total = len(own), sum(map(unshuffled, range(len(own))))
    while n < len(order) and total + unshuffled(n) <= target:
        total += unshuffled(n)
        n += 1
    while n >= len(own) and sum(map(count, pieces(n))) > target:  # the estimate numbered them unshuffled
        n -= 1
    if n < len(own):
        raise _too_short(task, target, sum(map(count, pieces(len(own)))))
    if n == len(order) and total < target - max(map(unshuffled, range(n))):  # the file ran out of paragraphs
        raise ValueError(f"{task}: the file's {len(docs)} paragraphs fill {total} of the {target} tokens asked; "
                         "give a shorter length or a larger file")
    doc = pieces(n)
    meta = dict(task=task, length=target, scorer="sub_em", doc_tokens=sum(map(count, doc)), num_docs=n,
                seed=seed, index=i)
    return Sample(f"{task}-{target}-{seed}-{i}", question, lambda: iter(doc), answers, meta)


def load_jsonl(path, scorer: str = "sub_em") -> list[Sample]:
    """One sample per line: {"id", "question", "context", "answers"} (answers: a string or a list)."""
    samples, ids = [], {}
    for where, rec in read_records(path):
        check_fields(where, rec, dict(id=(str, int), question=str, context=str, answers=(str, list)))
        answers = [rec["answers"]] if isinstance(rec["answers"], str) else rec["answers"]
        if not (answers and all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: field 'answers' should be a string or a non-empty list of strings")
        if str(rec["id"]) in ids:
            raise ValueError(f"{where}: id {rec['id']!r} is also {ids[str(rec['id'])]}'s")
        ids[str(rec["id"])] = where
        meta = dict(task="jsonl", length=None, scorer=scorer, record=where)
        samples.append(sample_at(where, str(rec["id"]), rec["question"], rec["context"], answers, meta))
    if not samples:
        raise ValueError(f"{path}: holds no records")
    return samples


def sample_at(where, *fields) -> Sample:
    try:
        return Sample(*fields)
    except ValueError as e:  # an empty question or answer, as the record holds it
        raise ValueError(f"{where}: {e}") from None


# -----------------------------------------------------------------------------
# metrics: metric(prediction, answers) -> float in [0, 1]; a None prediction (none extracted) scores 0

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation and articles, collapse spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction, answers) -> float:
    return float(prediction is not None and normalize_answer(prediction) in map(normalize_answer, answers))


def sub_em(prediction, answers) -> float:
    """Normalised gold inside the prediction or prediction inside the gold (the paper's metric)."""
    pred = normalize_answer(prediction) if prediction is not None else ""
    if not pred:
        return 0.0
    golds = [g for g in map(normalize_answer, answers) if g]
    return float(any(g in pred or pred in g for g in golds))


def f1(prediction, answers) -> float:
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            precision, recall = same / len(pred), same / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def string_match_all(prediction, answers) -> float:
    """Fraction of the gold strings found in the prediction, case-insensitive (RULER)."""
    if prediction is None or not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction, answers) -> float:
    return float(prediction is not None and any(a.lower() in prediction.lower() for a in answers))


def extract_boxed(text):
    """The content of the last \\boxed{...} (nested braces allowed), or None: what the metric scorers
    (exact_match, sub_em, ...) read from a final answer. An unclosed box gives way to the one before."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"):i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


# -----------------------------------------------------------------------------
# the MemAgent release's training reward (its verl hotpotqa reward, read for its rules)

def _release_box(text: str):
    """The release's last box: with "\\boxed " (a space) anywhere, the text after the last such
    marker up to the next "$"; else the last "\\boxed" followed at once by a braced group closed
    at its own depth. None for anything else (no box, an unclosed one, \\fbox, "\\boxed[..]")."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    depth = 0
    for i in range(start + len("\\boxed"), len(text)) if start >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            # the group must open right after the command, else the release's box is malformed
            return text[start + len("\\boxed{"):i] if text[start + len("\\boxed")] == "{" else None
    return None


def _math_string(s: str) -> str:
    """The math-answer string normalisation the release compares with (Hendrycks MATH's, cut short):
    line breaks, \\!, doubled backslashes, tfrac/dfrac, \\left/\\right, degrees, \\$ and \\%,
    a leading 0 before a bare decimal point, then every space."""
    # \\% goes twice, as in the release: removing one can join a backslash and a % into another
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""),
                     ("\\%", ""), ("\\%", ""), (" .", " 0."), ("{.", "{0."), (" ", "")):
        s = s.replace(old, new)
    return s


def boxed_em(text, answers) -> float:
    """The release's training reward, exactly: in the last 300 characters of the answer, lower-cased,
    the last \\boxed{} (see _release_box), normalised by _math_string, equal to any lower-cased,
    normalised gold answer. Formatting is not forgiven: \\boxed{Paris.}, \\boxed{\\text{Paris}} and
    \\boxed{**Paris**} score 0 against "Paris"."""
    if text is None:
        return 0.0
    boxed = _release_box(text[-300:].lower())
    if boxed is None:
        return 0.0
    golds = [answers] if isinstance(answers, str) else answers  # one gold answer given bare
    return float(any(_math_string(boxed) == _math_string(a.lower()) for a in golds))


# -----------------------------------------------------------------------------
# the release's evaluation frame: the final turn ends with "Therefore, the answer is ..."

# chat-template markers a decoded DeepSeek-R1 answer may still carry; the release drops them
_R1_MARKERS = ("<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")


def extract_answer_is(text):
    """The release's evaluation prediction: the text after the last "the answer is" (as written, lower
    case), once everything up to the last </think> is dropped (the whole text again if nothing
    follows it); asterisks removed, R1 markers and surrounding spaces and periods stripped. None
    without that phrase."""
    if text is None:
        return None
    text = text.strip()
    after = text.split("</think>")[-1].strip()
    text = (after or text).replace("*", "")
    if "the answer is" not in text:
        return None
    answer = text.rsplit("the answer is", 1)[-1].strip()
    for marker in _R1_MARKERS:
        answer = answer.replace(marker, "")
    return answer.strip().strip(".").strip()


def answer_is_sub_em(text, answers) -> float:
    """The release's RULER-HotpotQA score: the extracted answer and the first gold answer, SQuAD-
    normalised, one inside the other; no (or an empty) extraction scores 0. As in the release, an
    extraction that normalises to nothing ("?") is inside every gold and scores 1."""
    pred = extract_answer_is(text)
    if not pred or not answers:
        return 0.0
    pred, gold = normalize_answer(pred), normalize_answer(answers if isinstance(answers, str) else answers[0])
    return float(gold in pred or pred in gold)


def answer_is_string_match_all(text, answers) -> float:
    """The release's RULER score for the synthetic tasks: string_match_all on the extracted answer."""
    pred = extract_answer_is(text)
    return round(string_match_all(pred, answers), 2) if pred else 0.0  # rounded per answer, as there


def _on(extract, metric):
    def scorer(text, answers):
        pred = None if text is None else extract(text)
        return metric(pred, answers) if pred else 0.0
    return scorer


# Every scorer reads the model's whole final answer. A metric's name reads the last \\boxed{} (the
# boxed frame); answer_is_ + the name reads the text after "the answer is" (the release's evaluation
# frame; its sub_em and string_match_all are the release's own, above).
_METRICS = (exact_match, sub_em, f1, string_match_all, string_match_part)
SCORERS = {**{m.__name__: _on(extract_boxed, m) for m in _METRICS},
           **{"answer_is_" + m.__name__: _on(extract_answer_is, m) for m in _METRICS},
           "answer_is_sub_em": answer_is_sub_em, "answer_is_string_match_all": answer_is_string_match_all,
           "boxed_em": boxed_em}
FRAMES = ("boxed", "answer_is")  # how the final turn states its answer; a scorer name per frame below


def framed_scorer(name: str, frame: str) -> str:
    """The SCORERS name that scores metric `name` under `frame`: the name itself in the boxed frame."""
    if frame == "boxed" or name.startswith("answer_is_"):
        return name
    if "answer_is_" + name not in SCORERS:
        raise ValueError(f"scorer {name!r} has no form for the {frame!r} frame")
    return "answer_is_" + name


def score(sample: Sample, text, frame: str = "boxed") -> float:
    """The sample's scorer, in `frame`, on the model's whole final answer `text` (None: no answer, 0)."""
    return SCORERS[framed_scorer(sample.meta["scorer"], frame)](text, sample.answers)
