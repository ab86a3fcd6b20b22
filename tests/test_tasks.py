"""Tests for tasks.py: length fitting, needles and their token offsets, determinism, speed of a
1M-token document, the two_hop task and its ideal memory, length checks, the HotpotQA builder,
the JSONL loader and the scorers."""

import io
import json
import math
import os
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

import tasks
from tasks import Sample, parse_length


class WordTokenizer:
    """One token per whitespace-separated word: separators cost nothing."""

    def encode(self, text):
        return [len(w) for w in text.split()]


class ByteTokenizer:
    """One token per UTF-8 byte: the leading space of a piece costs a token."""

    def encode(self, text):
        return list(text.encode())


TOKENIZERS = [WordTokenizer(), ByteTokenizer()]


def true_tokens(sample, tok):
    return [t for piece in tasks.document_pieces(sample) for t in tok.encode(piece)]


ESSAY_TEXT = ("Small towns grow slowly. A river ran past the mill for a century! Who built the bridge? "
              "Nobody remembers now.\n\nThe market opened at dawn and closed at noon. ") * 3


ESSAY = os.path.join(tempfile.mkdtemp(prefix="essay"), "essay.txt")  # the file tasks.SOURCED read
with open(ESSAY, "w") as _f:
    _f.write(ESSAY_TEXT)


@pytest.fixture(scope="module")
def essay():
    return ESSAY


def samples_of(task, length, tok, num, seed, essay):
    return tasks.make_samples(task, length, tok, num, seed=seed, source=essay if task in tasks.SOURCED else None)


@pytest.fixture(scope="module")
def spm(essay):
    sentencepiece = pytest.importorskip("sentencepiece")
    lines = []
    for name in tasks.TASKS:
        sample = samples_of(name, 2000, WordTokenizer(), 1, 7, essay)[0]
        lines += tasks.document_text(sample).split(". ")
    model = io.BytesIO()
    # whitespace kept as written and a dummy prefix on every encode call: per-piece encoding
    # then differs from encoding the joined text, which the fit must count exactly anyway
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, minloglevel=2,
        byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity")
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def test_parse_length():
    assert parse_length("8k") == 8192
    assert parse_length("128K") == 131072
    assert parse_length("1m") == 1048576
    assert parse_length("3.5m") == int(3.5 * 1048576)
    assert parse_length(5000) == 5000 and parse_length("5000") == 5000
    for bad in ["8x", "", "k", "-1k", "1.2.3k", 0, "0k", True, 1.5, "300.5"]:  # a token count is whole
        with pytest.raises(ValueError, match="bad length"):
            parse_length(bad)


# Each task is checked against its own TaskSpec (tasks.TASKS): the checks below run for every
# registered task, and for a task a test registers itself (the last test of this section).

@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("tok", TOKENIZERS, ids=["words", "bytes"])
def test_fit_is_exact_and_below_target(task, tok):
    check_fit(task, tok)


def check_fit(task, tok):
    for length in ["1k", "8k", 20000]:
        target = parse_length(length)
        sample = samples_of(task, length, tok, 2, 3, ESSAY)[1]
        pieces = list(tasks.document_pieces(sample))
        counts = [len(tok.encode(p)) for p in pieces]
        assert sum(counts) == sample.meta["doc_tokens"] <= target
        # the guarantee: short of the target by less than one filler piece (fwe: by the few
        # words one more step of its Zipf counts would add)
        assert target - sum(counts) < (0.02 * target if task == "fwe" else max(counts))
        if target >= 8192:
            assert sum(counts) >= 0.98 * target
        assert not pieces[0][0].isspace() and all(p[0].isspace() for p in pieces[1:])
        assert sample.meta["task"] == task and sample.meta["length"] == target
        assert sample.meta["scorer"] == tasks.TASKS[task].scorer


@pytest.mark.parametrize("task", [name for name, spec in tasks.TASKS.items() if spec.needles])
def test_needles_offsets_and_answers(task):
    check_needles(task)


def check_needles(task):
    spec, tok = tasks.TASKS[task], ByteTokenizer()
    sample = samples_of(task, "4k", tok, 1, 11, ESSAY)[0]
    ids = true_tokens(sample, tok)
    relevant = [r for r in sample.meta["needles"] if r["relevant"]]
    for r in sample.meta["needles"]:
        assert ids[r["offset"]:r["offset"] + r["tokens"]] == tok.encode(" " + r["text"])
        assert 0 < r["depth"] < 1
    assert sample.meta["depth"] == relevant[0]["depth"]
    if spec.answers_in_needles:  # every gold string is in a relevant needle and nowhere in an irrelevant one
        for a in sample.answers:
            assert any(a in r["text"] for r in relevant)
            assert not any(a in r["text"] for r in sample.meta["needles"] if not r["relevant"])
    assert (len(sample.meta["needles"]), len(relevant)) == (spec.needles, spec.relevant)
    assert "boxed" not in sample.question and sample.question.endswith("?")


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_scorer_rewards_the_gold_answer_only(task):
    check_scorer(task)


def check_scorer(task):
    a, b = samples_of(task, "2k", WordTokenizer(), 2, 13, ESSAY)
    boxed = lambda answers: "\\boxed{" + ", ".join(answers) + "}"  # the boxed frame reads the last box
    assert tasks.score(a, boxed(a.answers)) == 1.0
    assert tasks.score(a, None) == 0.0 and tasks.score(a, boxed(b.answers)) < 1.0


def test_task_details():
    tok = WordTokenizer()
    s = tasks.TASKS["niah_multiquery"]("2k", tok)
    assert all(r["text"].split()[6] in s.question for r in s.meta["needles"])
    s = tasks.TASKS["niah_multivalue"]("2k", tok)
    assert len({r["text"].split()[6] for r in s.meta["needles"]}) == 1 and len(set(s.answers)) == 4
    s = tasks.TASKS["niah_multikey"]("2k", tok)
    keys = [r["text"].split()[6] for r in s.meta["needles"]]
    assert len(set(keys)) == 4 and sum(k in s.question for k in keys) == 1
    s = tasks.TASKS["vt"]("8k", tok, seed=5)
    text = tasks.document_text(s)
    positions = [text.index(r["text"]) for r in s.meta["needles"]]
    assert positions == sorted(positions)  # the chain reads in order
    value = s.question.split()[-1].rstrip("?")
    assert f"VAR {s.answers[0]} = {value}." in text
    s = tasks.fwe("8k", tok, seed=2)
    freq = Counter(tasks.document_text(s).split())
    assert freq.most_common(1)[0][0] == "..."
    assert [w for w, _ in freq.most_common(4)[1:]] == s.answers
    assert freq[s.answers[2]] > freq.most_common(5)[4][1]
    key = tasks.TASKS["passkey"]("1k", tok).answers[0]
    assert key.isdigit() and len(key) == 5
    assert all(len(a) == 7 for a in tasks.TASKS["niah_single"]("1k", tok).answers)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_deterministic(task):
    check_deterministic(task)


def check_deterministic(task):
    tok = WordTokenizer()
    a, b = samples_of(task, "4k", tok, 3, 9, ESSAY), samples_of(task, "4k", tok, 3, 9, ESSAY)
    for x, y in zip(a, b):
        assert (x.id, x.question, x.answers, x.meta) == (y.id, y.question, y.answers, y.meta)
        assert list(x.document()) == list(y.document()) == list(x.document())  # re-iterable
    assert len({x.question + str(x.answers) for x in a}) == 3
    other = samples_of(task, "4k", tok, 1, 10, ESSAY)[0]
    assert (other.question, other.answers) != (a[0].question, a[0].answers)
    # the same index asks the same question at every length
    longer = samples_of(task, "16k", tok, 1, 9, ESSAY)[0]
    assert (longer.question, longer.answers) == (a[0].question, a[0].answers)


def _sum_draw(seed, index):
    """A researcher's new task: two numbers in the haystack, the question asks their sum, an answer
    written in no needle, scored by exact match (so "16" is not an answer to "6")."""
    rng = tasks._rng("number_sum", seed, index)
    x, y = (int(v) for v in rng.integers(10, 99, size=2))
    return dict(rng=rng, haystack=tasks._noise_haystack(rng), needles=[f"The first number is {x}.",
                f"The second number is {y}."], relevant=[True, True],
                question="What is the sum of the first and the second number?", answers=[str(x + y)])


def test_a_task_added_in_its_generator_and_registry_alone_passes_the_task_checks(monkeypatch):
    spec = tasks.needle_task("number_sum", _sum_draw, scorer="exact_match", needles=2, relevant=2,
                             answers_in_needles=False)
    monkeypatch.setitem(tasks.TASKS, "number_sum", spec)
    for tok in TOKENIZERS:
        check_fit("number_sum", tok)
        check_minimum("number_sum", tok)
    check_needles("number_sum")
    check_scorer("number_sum")
    check_deterministic("number_sum")
    # and a spec that breaks its promise is caught
    monkeypatch.setitem(tasks.TASKS, "number_sum", replace(spec, needles=3))
    with pytest.raises(AssertionError):
        check_needles("number_sum")


def test_noise_cycle_starts_at_a_seeded_sentence():
    # short training documents must meet the filler cycle at every phase against the chunks
    for task in ["niah_single", "vt", "passkey", "two_hop"]:
        firsts = {next(iter(s.document())) for s in samples_of(task, 512, WordTokenizer(), 32, 0, ESSAY)}
        assert firsts <= set(tasks.NOISE) and len(firsts) >= 6


def test_haystacks_hold_no_key_words():
    key_words = set(tasks.ADJECTIVES) | set(tasks.NOUNS)
    for task in ["niah_single", "niah_single_words"]:
        s = samples_of(task, "16k", WordTokenizer(), 1, 0, ESSAY)[0]
        text = tasks.document_text(s)
        for r in s.meta["needles"]:
            text = text.replace(r["text"], "")
        assert not key_words & set(text.lower().replace(".", "").split())


def test_ideal_memory_trace():
    tok = WordTokenizer()
    for task in ["niah_multikey", "niah_multiquery", "vt"]:
        s = samples_of(task, "16k", tok, 1, 4, ESSAY)[0]
        trace = tasks.ideal_memory_trace(s, 1000)
        assert len(trace) == math.ceil(s.meta["doc_tokens"] / 1000)
        assert all(set(a) <= set(b) for a, b in zip(trace, trace[1:]))
        relevant = [r for r in s.meta["needles"] if r["relevant"]]
        assert sorted(trace[-1]) == sorted(r["text"] for r in relevant)
        # a reader keeping exactly the ideal memory answers correctly
        assert tasks.score(s, "\\boxed{" + " ".join(trace[-1]) + "}") == 1.0
        for r in relevant:
            first = (r["offset"] + r["tokens"] - 1) // 1000
            assert r["text"] in trace[first] and (first == 0 or r["text"] not in trace[first - 1])


def test_too_short_and_unknown():
    with pytest.raises(ValueError, match="niah_multiquery: length 40 is too short; .* at least 45 tokens"):
        tasks.TASKS["niah_multiquery"](40, WordTokenizer())
    with pytest.raises(ValueError, match="fwe: length 20 is too short"):
        tasks.fwe(20, WordTokenizer())
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.make_samples("nope", "8k", WordTokenizer(), 1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.check_length("nope", "8k", WordTokenizer())
    for num in [0, -3, True, 2.0]:
        with pytest.raises(ValueError, match="num must be a positive integer"):
            tasks.make_samples("vt", "8k", WordTokenizer(), num)


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("tok", TOKENIZERS, ids=["words", "bytes"])
def test_check_length_minimum_is_exact(task, tok):
    check_minimum(task, tok)


def check_minimum(task, tok):
    # the minimum the error names is the smallest length at which the whole cell builds
    source = ESSAY if task in tasks.SOURCED else None
    with pytest.raises(ValueError, match=f"{task}: length 10 is too short") as e:
        tasks.make_samples(task, 10, tok, 3, seed=2, source=source)
    minimum = int(str(e.value).split("at least ")[1].split()[0])
    assert tasks.check_length(task, minimum, tok, 3, seed=2, source=source) == minimum
    assert len(tasks.make_samples(task, minimum, tok, 3, seed=2, source=source)) == 3
    with pytest.raises(ValueError, match=f"{task}: length {minimum - 1} is too short; .* at least {minimum} "):
        tasks.check_length(task, minimum - 1, tok, 3, seed=2, source=source)
    # one of the three samples is what needs the minimum: it fails alone one token below
    fails = 0
    for i in range(3):
        try:
            tasks.TASKS[task](minimum - 1, tok, 2, i, source)
        except ValueError:
            fails += 1
    assert fails >= 1


def test_check_length_builds_no_document(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a document was built")
    monkeypatch.setattr(tasks, "_needle_sample", refuse)
    t0 = time.perf_counter()
    assert tasks.check_length("niah_single", "3.5m", WordTokenizer(), num=64) == int(3.5 * 2 ** 20)
    assert tasks.check_length("two_hop", "1k", ByteTokenizer(), num=64) == 1024
    assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# two_hop

def chain_answer(text, question):
    """Follow the question's two hops through the document: None unless each hop has one fact."""
    rel, person = re.fullmatch(r"Where does the (\w+) of (\w+) work\?", question).groups()
    links = re.findall(rf"The {rel} of {person} is (\w+)\.", text)
    places = re.findall(rf"\b{links[0]} works in (\w+)\.", text) if len(links) == 1 else []
    return places[0] if len(places) == 1 else None


def test_two_hop_questions():
    tok, chunk = WordTokenizer(), 128
    orders, split = Counter(), 0
    for seed in range(40):
        s = tasks.TASKS["two_hop"](512, tok, seed=seed, index=seed % 3)
        text = tasks.document_text(s)
        needles = s.meta["needles"]
        link, home = needles[0], needles[len(tasks._LINKS)]
        place = s.answers[0]
        assert s.answers == [chain_answer(text, s.question)] and len(s.answers) == 1
        assert place in tasks.PLACES and text.count(place) == 1 and home["text"].endswith(f"in {place}.")
        # hard distractors: the asked person's other relatives and the asked relation's other
        # people work elsewhere, and all of that is in the document
        rel, person = s.question.split()[3], s.question.split()[5]
        assert any(f"of {person} is" in n["text"] and rel not in n["text"] for n in needles)
        assert any(f"The {rel} of" in n["text"] and person not in n["text"] for n in needles)
        places = [n["text"].split()[-1].rstrip(".") for n in needles if " works in " in n["text"]]
        assert len(places) == 4 == len(set(places))
        for n in needles:
            assert " " + n["text"] in text
            text = text.replace(" " + n["text"], "")
        # the filler names no person and no place
        assert not (set(tasks.PEOPLE) | set(tasks.PLACES)) & set(text.replace(".", "").split())
        orders[link["offset"] < home["offset"]] += 1
        split += link["offset"] // chunk != home["offset"] // chunk
        assert tasks.score(s, f"\\boxed{{{place}}}") == 1.0 and tasks.score(s, f"\\boxed{{{places[1]}}}") == 0.0
    assert orders[True] >= 8 and orders[False] >= 8  # the two facts come in either order
    assert split >= 20  # and usually in different chunks


def test_two_hop_ideal_memory_trace():
    tok, chunk = WordTokenizer(), 128
    workplace_counts = Counter()
    for seed in range(30):
        s = tasks.TASKS["two_hop"](1024, tok, seed=seed)
        needles = s.meta["needles"]
        link, home = needles[0]["text"], needles[len(tasks._LINKS)]["text"]
        link_end = needles[0]["offset"] + needles[0]["tokens"]
        trace = tasks.ideal_memory_trace(s, chunk)
        assert len(trace) == math.ceil(s.meta["doc_tokens"] / chunk)
        for c, memory in enumerate(trace):
            read = [n for n in needles if n["offset"] + n["tokens"] <= (c + 1) * chunk]
            read.sort(key=lambda n: n["offset"])
            workplaces = [n["text"] for n in read if " works in " in n["text"]]
            if link_end <= (c + 1) * chunk:  # the bridge is known: its link and its workplace
                assert memory == [n["text"] for n in read if n["text"] in (link, home)]
            else:  # any workplace may be the bridge's: keep them all, no link fact
                assert memory == workplaces
                workplace_counts[len(workplaces)] += 1
            assert len(memory) <= 4
        assert sorted(trace[-1]) == sorted([link, home])
        assert chain_answer(" ".join(trace[-1]), s.question) == s.answers[0]
        # one chunk holding the whole document: the two facts in document order
        whole = tasks.ideal_memory_trace(s, s.meta["doc_tokens"])
        pair = sorted((n for n in needles if n["text"] in (link, home)), key=lambda n: n["offset"])
        assert whole == [[n["text"] for n in pair]]
    assert max(workplace_counts) >= 3  # distractor workplaces are held before the link shows up


def test_million_token_document_is_fast():
    tok = WordTokenizer()
    t0 = time.perf_counter()
    s = tasks.TASKS["niah_single"]("1m", tok)
    count = tasks._token_counter(tok)
    total = sum(count(p) for p in s.document())
    assert total == s.meta["doc_tokens"] and 0.98 * 2 ** 20 <= total <= 2 ** 20
    assert time.perf_counter() - t0 < 5.0


def test_sentencepiece_fit_and_offsets(spm):
    for task in ["niah_single_words", "niah_multikey", "vt", "fwe"]:
        s = samples_of(task, "4k", spm, 1, 1, ESSAY)[0]
        ids = true_tokens(s, spm)
        assert len(ids) == s.meta["doc_tokens"] and 0.98 * 4096 <= len(ids) <= 4096
        for r in s.meta["needles"]:
            span = ids[r["offset"]:r["offset"] + r["tokens"]]
            assert span == spm.encode(" " + r["text"]) and spm.decode(span).strip() == r["text"]


# ---------------------------------------------------------------------------------------------
# HotpotQA

def hotpot_items(n=12):
    """The dev-distractor layout: per question 2 gold and 8 hard distractor paragraphs; one
    distractor ("Shared") is every question's, as popular Wikipedia paragraphs are in the file."""
    items = []
    for i in range(n):
        gold = [[f"Gold {i}-{k}", [f"Gold fact {k} of {i}.", f" More gold {i}-{k}."]] for k in range(2)]
        hard = [[f"Hard {i}-{k}", [f"Hard fact {k} of {i}."]] for k in range(7)] + [["Shared", ["Seen by all."]]]
        context = hard[:3] + gold[:1] + hard[3:] + gold[1:]
        items.append({"_id": f"q{i}", "answer": f"A{i}", "question": f"Question {i}?",
                      "supporting_facts": [[f"Gold {i}-0", 0], [f"Gold {i}-1", 1], [f"Gold {i}-0", 9]],
                      "context": context, "type": "bridge", "level": "hard"})
    return items


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def parse_docs(text):
    out = []
    for i, doc in enumerate(text.split("\n\n"), 1):
        head, title, body = doc.split("\n")
        assert head == f"Document {i}:"
        out.append((title, body))
    return out


def test_hotpotqa_release_contexts(tmp_path):
    items = hotpot_items()
    path = write(tmp_path / "hp.json", items)
    samples = tasks.load_hotpotqa(path, num_docs=30, seed=1)
    assert [s.id for s in samples] == [f"q{i}" for i in range(12)]
    own_places = set()
    for s, item in zip(samples, items):
        pieces = list(tasks.document_pieces(s))
        docs = parse_docs("".join(pieces))
        own = {title: "".join(sentences) for title, sentences in item["context"]}
        others = {t for other in items if other is not item for t, _ in other["context"]} - set(own)
        titles = [t for t, _ in docs]
        assert len(docs) == len(pieces) == 30 and len(set(titles)) == 30
        assert set(own) <= set(titles) and set(titles) - set(own) <= others  # all its own, fill from others
        for title, body in docs:
            assert body == own.get(title, body) and title.split()[0] in ("Gold", "Hard", "Shared")
        # exactly the release's format: "Document i:\n{title}\n{text}", joined by blank lines
        text = "\n\n".join(f"Document {k}:\n{t}\n{b}" for k, (t, b) in enumerate(docs, 1))
        assert "".join(pieces) == text and pieces[1].startswith("\n\nDocument 2:\n")
        assert s.answers == [item["answer"]] and s.question == item["question"]
        assert s.meta["scorer"] == "sub_em" and s.meta["context"] == "release"
        assert s.meta["gold_titles"] == [f"Gold {s.id[1:]}-0", f"Gold {s.id[1:]}-1"]
        assert s.meta["supporting"] == [f"Gold fact 0 of {s.id[1:]}.", f"More gold {s.id[1:]}-1."]
        own_places.add(tuple(k for k, t in enumerate(titles) if t in own))
    # the release's placement: the same slots for every question, not the first ones
    assert len(own_places) == 1 and own_places != {tuple(range(10))}


def test_hotpotqa_seeds_sizes_and_subsets(tmp_path):
    path = write(tmp_path / "hp.json", hotpot_items())
    text = lambda samples: [tasks.document_text(s) for s in samples]  # noqa: E731
    titles = lambda s: {t for t, _ in parse_docs(tasks.document_text(s))}  # noqa: E731
    samples = tasks.load_hotpotqa(path, num_docs=30, seed=1)
    assert text(tasks.load_hotpotqa(path, num_docs=30, seed=1)) == text(samples)
    assert text(samples) == [tasks.document_text(s) for s in samples]  # re-iterable
    other = tasks.load_hotpotqa(path, num_docs=30, seed=2)
    assert all(a != b for a, b in zip(text(samples), text(other)))
    assert any(titles(a) != titles(b) for a, b in zip(samples, other))  # a different fill, not only order
    # the filler is drawn for each document count apart, not nested
    fewer = tasks.load_hotpotqa(path, num_docs=15, seed=1)
    assert all(len(titles(a)) == 15 for a in fewer) and any(not titles(a) <= titles(b) for a, b in zip(fewer, samples))
    # the question's own paragraphs, in the order of its context, go where the release's fixed shuffle
    # (random.Random(4) over the slots) sends the first entries of the list
    for n in (15, 30):
        order = list(range(n))
        random.Random(4).shuffle(order)
        for s, item in zip(tasks.load_hotpotqa(path, num_docs=n, seed=1), hotpot_items()):
            docs = parse_docs(tasks.document_text(s))
            assert [docs[k][0] for k in range(n) if order[k] < 10] == [item["context"][order[k]][0]
                                                                        for k in range(n) if order[k] < 10]
    # num_samples: the file's first questions, as the release takes its first 128
    subset = tasks.load_hotpotqa(path, num_docs=30, num_samples=5, seed=1)
    assert [s.id for s in subset] == ["q0", "q1", "q2", "q3", "q4"]
    assert [tasks.document_text(s) for s in subset] == text(samples[:5])
    assert len(tasks.load_hotpotqa(path, num_docs=30, num_samples=50)) == 12


def test_hotpotqa_json_and_jsonl_agree(tmp_path):
    items = hotpot_items()
    from_json = tasks.load_hotpotqa(write(tmp_path / "hp.json", items), num_docs=25, seed=3)
    path = write_jsonl(tmp_path / "hp.jsonl", items)
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line is skipped
    from_jsonl = tasks.load_hotpotqa(path, num_docs=25, seed=3)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())  # as some editors save it
    assert [s.id for s in tasks.load_hotpotqa(bom, num_docs=25, seed=3)] == [s.id for s in from_json]
    for a, b in zip(from_json, from_jsonl, strict=True):
        assert (a.id, a.question, a.answers, a.meta) == (b.id, b.question, b.answers, b.meta)
        assert tasks.document_text(a) == tasks.document_text(b)


def test_hotpotqa_supporting_context(tmp_path):
    items = hotpot_items()
    samples = tasks.load_hotpotqa(write(tmp_path / "hp.json", items), num_docs=5, seed=0,
                                  context="supporting")
    for s in samples:
        docs = dict(parse_docs(tasks.document_text(s)))
        assert len(docs) == 5 and set(s.meta["gold_titles"]) <= set(docs)
        assert docs[f"Gold {s.id[1:]}-1"] == f"Gold fact 1 of {s.id[1:]}. More gold {s.id[1:]}-1."


def test_hotpotqa_errors(tmp_path):
    path = write(tmp_path / "hp.json", hotpot_items(3))
    with pytest.raises(ValueError, match=r"hp.json\[0\]: 10 paragraphs of its own .release context., more than num_docs=9"):
        tasks.load_hotpotqa(path, num_docs=9)
    with pytest.raises(ValueError, match=r"hp.json\[0\]: the file's 28 distinct paragraphs are too few for num_docs=40"):
        tasks.load_hotpotqa(path, num_docs=40)
    for bad in [0, -5, "200", 2.5, True]:
        with pytest.raises(ValueError, match="num_docs must be a positive integer"):
            tasks.load_hotpotqa(path, num_docs=bad)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        tasks.load_hotpotqa(path, num_docs=20, num_samples=0)
    with pytest.raises(ValueError, match="context must be 'release' or 'supporting', got 'gold'"):
        tasks.load_hotpotqa(path, num_docs=20, context="gold")
    with pytest.raises(ValueError, match="missing.json"):
        tasks.load_hotpotqa(tmp_path / "missing.json", num_docs=50)
    (tmp_path / "bad.json").write_text("[{not json")
    with pytest.raises(ValueError, match="bad.json: malformed JSON"):
        tasks.load_hotpotqa(tmp_path / "bad.json", num_docs=50)
    (tmp_path / "bad.jsonl").write_text(json.dumps(hotpot_items(1)[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:3: malformed JSON"):
        tasks.load_hotpotqa(tmp_path / "bad.jsonl", num_docs=50)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: expected a non-empty list"):
        tasks.load_hotpotqa(tmp_path / "empty.jsonl", num_docs=50)


@pytest.mark.parametrize("edit,message", [
    (lambda it: it.pop("supporting_facts"), r"missing field 'supporting_facts'"),
    (lambda it: it.pop("_id"), r"missing field '_id'"),
    (lambda it: it.update(answer=["A"]), r"field 'answer' should be a str"),
    (lambda it: it.update(context={"T": []}), r"field 'context' should be a list"),
    (lambda it: it["context"].__setitem__(0, ["T", "not a list"]), r"field 'context' should hold"),
    (lambda it: it["supporting_facts"].append(["Gold 2-0", True]), r"field 'supporting_facts' should hold"),
    (lambda it: it["supporting_facts"].append(["Nowhere", 0]), r"supporting title 'Nowhere'"),
    (lambda it: it.clear() or it.update(x=1), r"missing field '_id'"),
])
@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_hotpotqa_bad_items(tmp_path, edit, message, layout):
    items = hotpot_items(4)
    edit(items[2])
    where = re.escape("hp.json[2]" if layout == "json" else "hp.jsonl:3")  # the item, or its line
    path = (write if layout == "json" else write_jsonl)(tmp_path / f"hp.{layout}", items)
    with pytest.raises(ValueError, match=f"{where}: {message}"):
        tasks.load_hotpotqa(path, num_docs=20)
    items[2] = "a string"
    path = (write if layout == "json" else write_jsonl)(tmp_path / f"hp.{layout}", items)
    with pytest.raises(ValueError, match=f"{where}: expected a JSON object"):
        tasks.load_hotpotqa(path, num_docs=20)


# ---------------------------------------------------------------------------------------------
# JSONL

def test_load_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "question": "Q?", "context": "Long text.", "answers": ["x", "y"]}\n'
                    '\n   \n'
                    '{"id": 7, "question": "Q2?", "context": "More.", "answers": "z"}\n')
    a, b = tasks.load_jsonl(path)
    assert (a.id, a.question, a.document, a.answers) == ("a", "Q?", "Long text.", ["x", "y"])
    assert (b.id, b.answers, b.meta["record"], b.meta["scorer"]) == ("7", ["z"], f"{path}:4", "sub_em")
    assert tasks.document_text(b) == "More." and tasks.score(b, "\\boxed{it is Z}") == 1.0


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "question": "Q", "context": "c"', "malformed JSON"),
    ('{"id": "a", "question": "Q", "answers": ["x"]}', "missing field 'context'"),
    ('{"id": "a", "question": 3, "context": "c", "answers": ["x"]}', "field 'question'"),
    ('{"id": "a", "question": "Q", "context": "c", "answers": []}', "field 'answers'"),
    ('{"id": "a", "question": "Q", "context": "c", "answers": [1]}', "field 'answers'"),
    ('["a list"]', "expected a JSON object"),
])
def test_load_jsonl_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "question": "Q", "context": "c", "answers": ["x"]}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: {message}"):
        tasks.load_jsonl(path)


def test_load_jsonl_bad_files(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"id": "a", "question": "Q", "context": "c", "answers": ["x"]}\n'
                     b'{"id": "b", "question": "Caf\xe9", "context": "c", "answers": ["x"]}\n')
    with pytest.raises(ValueError, match="latin.jsonl:2: not UTF-8"):
        tasks.load_jsonl(path)
    with pytest.raises(ValueError, match="nothere.jsonl"):
        tasks.load_jsonl(tmp_path / "nothere.jsonl")


# ---------------------------------------------------------------------------------------------
# scorers

def test_normalize_answer():
    assert tasks.normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert tasks.normalize_answer("an apple a day") == "apple day"
    assert tasks.normalize_answer("Theatre another") == "theatre another"  # articles as words only
    assert tasks.normalize_answer("Café Ünïcode") == "café ünïcode"
    assert tasks.normalize_answer("?!...") == ""


def test_exact_match_and_sub_em():
    golds = ["The Beatles", "Beatles band"]
    assert tasks.exact_match("beatles.", golds) == 1.0
    assert tasks.exact_match("The Beatles band", golds) == 1.0  # the second alias
    assert tasks.exact_match("Beatles live", golds) == 0.0
    assert tasks.exact_match(None, golds) == 0.0
    assert tasks.sub_em("It was the Beatles, surely", golds) == 1.0  # gold inside prediction
    assert tasks.sub_em("band", golds) == 1.0  # prediction inside a gold
    assert tasks.sub_em("Rolling Stones", golds) == 0.0
    assert tasks.sub_em("?!", golds) == 0.0  # empty after normalisation
    assert tasks.sub_em("the", golds) == 0.0
    assert tasks.sub_em(None, golds) == 0.0
    assert tasks.sub_em("anything", ["The"]) == 0.0  # a gold that normalises away never matches


def test_f1():
    assert tasks.f1("the cat sat", ["a cat sat down"]) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert tasks.f1("dog", ["cat", "dog"]) == 1.0
    assert tasks.f1("", ["cat"]) == 0.0 and tasks.f1(None, ["cat"]) == 0.0
    assert tasks.f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_string_match():
    golds = ["1234567", "Alpha"]
    assert tasks.string_match_all("alpha and 1234567", golds) == 1.0
    assert tasks.string_match_all("ALPHA only", golds) == 0.5
    assert tasks.string_match_all(None, golds) == 0.0
    assert tasks.string_match_part("ALPHA only", golds) == 1.0
    assert tasks.string_match_part("nothing", golds) == 0.0
    assert tasks.string_match_part(None, golds) == 0.0


def test_boxed_em_is_the_release_reward():
    """The last \\boxed{} of the answer's final 300 characters, lower-cased, math-string normalised,
    equal to a gold answer; formatting is not forgiven and a malformed box scores 0."""
    golds = ["Paris"]
    assert tasks.boxed_em("It is \\boxed{Paris}.", golds) == 1.0
    assert tasks.boxed_em("\\boxed{PARIS}", ["paris"]) == 1.0  # both sides lower-cased
    assert tasks.boxed_em("\\boxed{ New York }", ["new york"]) == 1.0  # every space dropped
    for text in ("\\boxed{Paris.}", "\\boxed{\\text{Paris}}", "\\boxed{**Paris**}", "Paris", "\\boxed{Paris",
                 "\\fbox{Paris}", "\\boxed\\text{Paris}", "\\boxed{Paris, France}", "", None):
        assert tasks.boxed_em(text, golds) == 0.0, text
    assert tasks.boxed_em("\\boxed{Lyon} or rather \\boxed{Paris}", golds) == 1.0  # the last box
    assert tasks.boxed_em("\\boxed{Paris} or rather \\boxed{Lyon}", golds) == 0.0
    assert tasks.boxed_em("\\boxed{Paris}" + " " * 300, golds) == 0.0  # outside the last 300 characters
    assert tasks.boxed_em("x" * 1000 + "\\boxed{Paris}", golds) == 1.0
    assert tasks.boxed_em("\\boxed{Rome}", ["Paris", "Rome"]) == 1.0  # any gold
    assert tasks.boxed_em("\\boxed{Rome}", "Rome") == 1.0 and tasks.boxed_em("\\boxed{R}", "Rome") == 0.0  # one, bare
    assert tasks.boxed_em("\\boxed{{Paris}}", golds) == 0.0  # braces are kept
    # "\\boxed " (a space) takes the text after it up to a dollar sign, anywhere in the answer
    assert tasks.boxed_em("$\\boxed Paris$ is it", golds) == 1.0
    assert tasks.boxed_em("\\boxed Paris and \\boxed{Lyon}", golds) == 0.0
    # the math-string rules: \\left, \\right, \\!, \\$, \\%, tfrac, a bare decimal point, line breaks
    assert tasks.boxed_em("\\boxed{\\left(1,2\\right)}", ["(1, 2)"]) == 1.0
    assert tasks.boxed_em("\\boxed{50\\%}", ["50"]) == 1.0 and tasks.boxed_em("\\boxed{50%}", ["50"]) == 0.0
    assert tasks.boxed_em("\\boxed{\\$5}", ["5"]) == 1.0
    assert tasks.boxed_em("\\boxed{\\tfrac{1}{2}}", ["\\frac{1}{2}"]) == 1.0
    assert tasks.boxed_em("\\boxed{x = .5}", ["x=0.5"]) == 1.0
    assert tasks.boxed_em("\\boxed{new\nyork}", ["newyork"]) == 1.0
    assert tasks.boxed_em("\\boxed{90^\\circ}", ["90"]) == 1.0 and tasks.boxed_em("\\boxed{a\\!b}", ["ab"]) == 1.0


def test_answer_is_sub_em_is_the_release_evaluation():
    score = tasks.SCORERS["answer_is_sub_em"]
    golds = ["The Beatles", "Queen"]
    assert score("I think so. Therefore, the answer is The Beatles.", golds) == 1.0
    assert score("Therefore, the answer is **Beatles**", golds) == 1.0  # asterisks go; prediction in gold
    assert score("the answer is Ringo and the Beatles", golds) == 1.0  # gold in prediction
    assert score("the answer is Queen", golds) == 0.0  # the first gold answer only
    assert score("the answer is Queen", "Queen") == 1.0  # one gold answer, given bare
    assert score("The Beatles", golds) == 0.0 and score(None, golds) == 0.0  # nothing extracted
    assert score("The answer is The Beatles", golds) == 0.0  # the phrase as written, in lower case
    assert score("the answer is .", golds) == 0.0  # empty once the periods go
    assert score("the answer is Stones, not the answer is Beatles", golds) == 1.0  # the last one
    assert score("the answer is Beatles</think> so the answer is Stones", golds) == 0.0  # after </think>
    assert score("<think>the answer is Stones</think>the answer is Beatles", golds) == 1.0
    assert score("<think>the answer is Beatles</think>  ", golds) == 1.0  # nothing after: the whole text
    assert score("the answer is ?", golds) == 1.0  # as in the release: "" is inside every gold
    assert tasks.extract_answer_is("So the answer is ...Paris..  ") == "Paris"
    assert tasks.extract_answer_is("no phrase") is None


def test_scorers_read_the_whole_answer_in_their_frame():
    golds = ["alpha", "beta"]
    assert tasks.SCORERS["string_match_all"]("\\boxed{Alpha, beta}", golds) == 1.0
    assert tasks.SCORERS["string_match_all"]("alpha beta", golds) == 0.0  # no box, no prediction
    assert tasks.SCORERS["answer_is_string_match_all"]("the answer is alpha", golds) == 0.5
    assert tasks.SCORERS["answer_is_string_match_all"]("the answer is a, b, c", ["a", "b", "x"]) == 0.67  # rounded
    assert tasks.SCORERS["answer_is_exact_match"]("so the answer is Beta.", golds) == 1.0
    s = Sample("x", "Q?", "doc", golds, {"scorer": "sub_em"})
    assert tasks.score(s, "\\boxed{beta}") == 1.0 and tasks.score(s, "the answer is beta") == 0.0
    assert tasks.score(s, "the answer is beta", frame="answer_is") == 0.0  # first gold only
    assert tasks.score(s, "the answer is alpha", frame="answer_is") == 1.0
    with pytest.raises(ValueError, match="'boxed_em' has no form for the 'answer_is' frame"):
        tasks.score(Sample("x", "Q?", "", golds, {"scorer": "boxed_em"}), "", frame="answer_is")


def test_score_uses_meta_scorer():
    s = Sample("x", "Q?", "doc", ["Alpha", "Beta"], {"scorer": "string_match_all"})
    assert tasks.score(s, "\\boxed{alpha beta}") == 1.0 and tasks.score(s, "\\boxed{alpha}") == 0.5
    s.meta["scorer"] = "sub_em"
    assert tasks.score(s, "\\boxed{the beta}") == 1.0
    metrics = {"exact_match", "sub_em", "f1", "string_match_all", "string_match_part"}
    assert set(tasks.SCORERS) == metrics | {"answer_is_" + m for m in metrics} | {"boxed_em"}


# -----------------------------------------------------------------------------
# RULER's needle tasks as the release evaluates them

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def essay_file(tmp_path):
    path = tmp_path / "essay.txt"
    path.write_text("The first essay sentence is here.  It goes on!\n\nDoes it end? Never quite.\n")
    return path


def test_ruler_key_and_value_formats(tmp_path):
    tok, essay = WordTokenizer(), essay_file(tmp_path)
    formats = dict(niah_single_1=("words", r"\d{7}"), niah_single_2=("words", r"\d{7}"),
                   niah_single_3=("words", UUID), niah_multikey_3=(UUID, UUID))
    for task, (key, value) in formats.items():
        for s in tasks.make_samples(task, 2000, tok, 3, source=essay if task in tasks.SOURCED else None):
            asked = re.fullmatch(r"What is the magic \w+ for (\S+)\?", s.question).group(1)
            assert (re.fullmatch(r"[a-z]+-[a-z]+", asked) if key == "words" else re.fullmatch(key, asked))
            assert len(s.answers) == 1 and re.fullmatch(value, s.answers[0])
            assert s.meta["doc_tokens"] <= 2000 and s.answers[0] in tasks.document_text(s)
            assert s.meta["scorer"] == "string_match_all"


def test_ruler_essay_haystack_is_the_users_text_cycled(tmp_path):
    essay = essay_file(tmp_path)
    s = tasks.make_samples("niah_multivalue_essay", 300, WordTokenizer(), 1, source=essay)[0]
    text = tasks.document_text(s)
    for r in s.meta["needles"]:
        text = text.replace(" " + r["text"], "")
    sentences = ["The first essay sentence is here.", "It goes on!", "Does it end?", "Never quite."]
    assert text.startswith(" ".join(sentences * 3)) and len(text.split()) > 250  # whitespace normalised, cycled
    assert len(s.answers) == 4 and s.question.startswith("What are all the magic numbers for ")
    multi = tasks.make_samples("niah_multiquery_essay", 300, WordTokenizer(), 1, source=essay)[0]
    assert len(multi.answers) == 4 and multi.question.count("-") == 4
    with pytest.raises(ValueError, match="niah_single_2 reads its haystack from a text file: give it as "
                                         "niah_single_2:FILE"):
        tasks.make_samples("niah_single_2", 300, WordTokenizer(), 1)
    with pytest.raises(ValueError, match="missing.txt: cannot read the essay haystack"):
        tasks.make_samples("niah_single_2", 300, WordTokenizer(), 1, source=tmp_path / "missing.txt")


def test_ruler_needle_haystack_is_other_keys_needles():
    for task, value in (("niah_multikey_2", r"\d{7}"), ("niah_multikey_3", UUID)):
        s = samples_of(task, 1500, WordTokenizer(), 1, 3, ESSAY)[0]
        key = s.question.split(" for ")[1].rstrip("?")
        sentences = re.findall(r"One of the magic \w+ for (\S+) is (\S+)\.", tasks.document_text(s))
        assert len(sentences) > 50 and all(re.fullmatch(value, v) for _, v in sentences)
        assert [v for k, v in sentences if k == key] == s.answers  # the asked key's needle alone
        assert 1500 - 12 < s.meta["doc_tokens"] <= 1500  # fitted to the length like every task


def squad_file(tmp_path, articles=3, paragraphs=4):
    """SQuAD v2's layout: articles of paragraphs, each with questions (one unanswerable)."""
    data = [{"title": f"A{a}", "paragraphs": [
        {"context": f"Paragraph {p} of article {a} says item {a}{p} is blue.",
         "qas": [{"question": f"What colour is item {a}{p}?", "answers": [{"text": "blue"}, {"text": "Blue"}],
                  "is_impossible": False},
                 {"question": "Unanswerable?", "answers": [], "is_impossible": True}]}
        for p in range(paragraphs)]} for a in range(articles)]
    return write(tmp_path / "squad.json", {"version": "v2.0", "data": data})


def test_ruler_qa_1_squad(tmp_path):
    tok, path = WordTokenizer(), squad_file(tmp_path)
    samples = tasks.load_ruler_qa("qa_1", path, 60, tok, 20)
    assert len(samples) == 12  # the answerable questions, in file order
    order = list(range(samples[0].meta["num_docs"]))
    random.Random(42).shuffle(order)
    for s in samples:
        text = tasks.document_text(s)
        docs = [d.split("\n", 1)[1] for d in text.split("\n\n")]
        assert s.meta["doc_tokens"] == len(tok.encode(text)) <= 60 and s.answers == ["blue", "Blue"]
        a, p = s.question.split("item ")[1].rstrip("?")
        own = f"Paragraph {p} of article {a} says item {a}{p} is blue."
        assert docs.count(own) == 1 and len(set(docs)) == len(docs) == s.meta["num_docs"]
        article = [d for d in docs if f"of article {a} " in d]
        assert len(article) == 4  # the other paragraphs of its article come before other articles'
        assert docs.index(own) == order.index(0)  # RULER's fixed shuffle puts its own paragraph there
        assert s.meta["scorer"] == "sub_em"
    with pytest.raises(ValueError, match="qa_1: length 5 is too short"):
        tasks.load_ruler_qa("qa_1", path, 5, tok, 1)
    with pytest.raises(ValueError, match="expected SQuAD's layout"):
        tasks.load_ruler_qa("qa_1", write(tmp_path / "hp.json", hotpot_items(2)), 60, tok, 1)


def test_ruler_qa_2_hotpotqa(tmp_path):
    tok, items = WordTokenizer(), hotpot_items(4)
    for path in (write(tmp_path / "hp.json", items), write_jsonl(tmp_path / "hp.jsonl", items)):
        samples = tasks.load_ruler_qa("qa_2", path, 300, tok, 2)
        for s, item in zip(samples, items):
            text = tasks.document_text(s)
            for title, sentences in item["context"]:
                assert f":\n{title}\n{''.join(sentences)}" in text  # every own paragraph, as title and text
            assert s.answers == [item["answer"]] and 10 < s.meta["num_docs"] and 270 < s.meta["doc_tokens"] <= 300
        with pytest.raises(ValueError, match="the file's 37 paragraphs fill .* of the 2000 tokens asked"):
            tasks.load_ruler_qa("qa_2", path, 2000, tok, 1)  # never a document shorter than its length says


# ---- the record boundary: any record is read into a usable sample or refused by file and field ----------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.text(max_size=5), st.lists(st.text(max_size=3),
                                                                                              max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@settings(max_examples=80, deadline=None)
@given(record=st.fixed_dictionaries({}, optional={"id": VALUES, "question": VALUES, "context": VALUES,
                                                  "answers": VALUES, "extra": VALUES}))
def test_any_jsonl_record_is_a_usable_sample_or_refused_by_file(record, tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        (sample,) = tasks.load_jsonl(path)
    except ValueError as e:
        assert "r.jsonl" in str(e) or "sample" in str(e), e
        return
    assert sample.question.strip() and sample.answers and all(a.strip() for a in sample.answers)
    assert isinstance(sample.document, str) and isinstance(sample.id, str)


@settings(max_examples=60, deadline=None)
@given(context=st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.lists(st.sampled_from(["x. ", "y. ", ""]),
                                                                             max_size=2)).map(list), max_size=3),
       facts=st.lists(st.tuples(st.sampled_from(["A", "B", "Z"]), st.integers(-1, 2)).map(list), max_size=3),
       answer=st.sampled_from(["", "x", 3]))
def test_any_hotpotqa_item_reads_its_own_paragraphs_or_is_refused(context, facts, answer, tmp_path_factory):
    item = dict(_id="q", question="Who?", answer=answer, supporting_facts=facts, context=context)
    filler = [dict(_id=f"f{i}", question="F?", answer="f", supporting_facts=[[f"T{i}", 0]],
                   context=[[f"T{i}", [f"filler {i}."]]]) for i in range(4)]
    path = tmp_path_factory.mktemp("hp") / "hp.json"
    path.write_text(json.dumps([item] + filler))
    try:
        samples = tasks.load_hotpotqa(path, 4)
    except ValueError as e:
        assert "hp.json" in str(e) or "sample q" in str(e), e
        return
    text = tasks.document_text(samples[0])
    assert all(f"\n{title}\n" in text for title, _ in facts)  # the question's own paragraphs are in its document


def test_a_record_with_an_empty_question_or_answer_is_named_by_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "question": "Q?", "context": "c", "answers": ["x"]}\n'
                    '{"id": "b", "question": "Q?", "context": "c", "answers": ["", "y"]}\n')
    with pytest.raises(ValueError, match="d.jsonl:2: sample b: answers must be"):
        tasks.load_jsonl(path)
    items = hotpot_items(3)
    items[1]["question"] = "  "
    with pytest.raises(ValueError, match=r"hp.json\[1\]: sample .*the question must be"):
        tasks.load_hotpotqa(write(tmp_path / "hp.json", items), num_docs=20)


def test_a_jsonl_line_may_hold_any_unicode_line_separator_inside_a_string(tmp_path):
    path = tmp_path / "u.jsonl"
    rec = dict(id="a", question="Where\u2028is it?", context="Here\u2029and\x85there.", answers=["here"])
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    (sample,) = tasks.load_jsonl(path)
    assert sample.question == rec["question"] and sample.document == rec["context"]


def test_an_essay_file_with_a_byte_order_mark_reads_as_its_text(tmp_path):
    (tmp_path / "bom.txt").write_text("\ufeffFirst sentence here. Second one.", encoding="utf-8")
    s = tasks.make_samples("niah_single_2", 300, WordTokenizer(), 1, source=tmp_path / "bom.txt")[0]
    assert "\ufeff" not in tasks.document_text(s)
