"""memory_agent.py: chunking, the overwrite loop, independent progression, extraction, bad input.

The plumbing is proven with a scripted stand-in for the LLM (it keeps the lines of a section that
mention the key), so the agent must answer needle tasks at every length whatever a model can do.
"""
import re

import pytest
import torch

from memory_agent import ChunkStream, MemoryAgent, document_tokens, extract_boxed
from rollout import Completion, Engine, SamplingParams
from tasks import Sample, make_samples, score


class CharTokenizer:
    """One token per character: decode(encode(t)) == t, so the scripted policy can read prompts."""
    pad_id, eos_id, bos_id = 0, 1, None
    stop_ids = [1]

    def encode(self, text):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i > 1)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            c = m["content"]
            ids += self.encode("<user>\n") + (self.encode(c) if isinstance(c, str) else list(c)) + self.encode("\n")
        return ids + self.encode("<assistant>\n")


class ScriptedEngine:
    """The engine's interface around a rule-based policy. Each step answers every queued request,
    like one engine step per turn for the whole batch. It records the order of turns."""

    def __init__(self, tok, max_len=100_000):
        self.tok, self.max_len = tok, max_len
        self.queue, self.log, self.ids = [], [], 0
        self.stats = dict(prefill_tokens=0, decode_tokens=0, prefill_s=0.0, decode_s=0.0)

    def add_request(self, prompt, params):
        self.queue.append((self.ids, prompt, params))
        self.ids += 1
        return self.ids - 1

    def has_unfinished(self):
        return bool(self.queue)

    def step(self):
        done, self.queue = self.queue, []
        out = []
        for rid, prompt, params in done:
            text = self.tok.decode(prompt)
            problem = re.search(r"<problem>\n(.*?)\n</problem>", text, re.S).group(1)
            memory = re.search(r"<memory>\n(.*?)\n</memory>", text, re.S).group(1)
            key = (re.search(r"for (\S+)\?", problem) or re.search(r"(pass key)", problem)).group(1)
            section = re.search(r"<section>\n(.*?)\n</section>", text, re.S)
            self.log.append((problem, "update" if section else "final"))
            if section:
                # memory = "kept sentences|unfinished tail": a needle may straddle two chunks
                kept, _, tail = ("" if memory == "No previous memory." else memory).partition("|")
                sentences = re.split(r"(?<=\.)(?=\s)", tail + section.group(1))
                tail = "" if sentences[-1].endswith(".") else sentences.pop()
                kept = " ".join([kept] + [s.strip() for s in sentences if key in s]).strip()
                reply = kept + "|" + tail
            else:
                numbers = re.findall(r"\d{5,7}", memory.partition("|")[0])
                reply = f"The number is \\boxed{{{numbers[-1] if numbers else 'none'}}}."
            ids = self.tok.encode(reply)[: params.max_new_tokens - 1] + [1]
            out.append(Completion(ids, [-0.5] * len(ids), "stop", None, rid))
        return out


TOK = CharTokenizer()


@pytest.mark.parametrize("length", [2000, 9000, 60000])
def test_scripted_policy_answers_needles_at_every_length(length):
    samples = make_samples("niah_single", length, TOK, num=3, seed=1)
    agent = MemoryAgent(ScriptedEngine(TOK), TOK, chunk_tokens=1500, memory_tokens=300, answer_tokens=64)
    trajs = agent.run(samples)
    for s, t in zip(samples, trajs):
        doc_tokens = s.meta["doc_tokens"]
        assert t.error is None and t.tokens_read == doc_tokens
        assert len(t.conversations) == -(-doc_tokens // 1500) + 1  # ceil(L / chunk) + 1
        assert t.conversations[-1].is_final and not any(c.is_final for c in t.conversations[:-1])
        assert score(s, t.answer) == 1.0, (t.answer, s.answers)


def test_chunks_are_exact_slices_and_prompts_fit():
    sample = make_samples("passkey", 5000, TOK, num=1)[0]
    doc = [i for piece in document_tokens(sample.document, TOK) for i in piece]
    engine = ScriptedEngine(TOK, max_len=4000)
    agent = MemoryAgent(engine, TOK, chunk_tokens=1000, memory_tokens=500, answer_tokens=64, question_tokens=200)
    t = agent.run([sample])[0]
    chunks = []
    for c in t.conversations[:-1]:
        text = TOK.decode(c.prompt_ids)
        chunks.append(re.search(r"<section>\n(.*?)\n</section>", text, re.S).group(1))
        assert len(c.prompt_ids) + 500 <= engine.max_len
    assert TOK.encode("".join(chunks)) == doc


def test_budget_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="chunk_tokens=5000"):
        MemoryAgent(ScriptedEngine(TOK, max_len=6000), TOK)


def test_short_documents_finish_first():
    s = make_samples("niah_single", 1500, TOK, num=1, seed=2)[0]
    long = make_samples("niah_single", 30000, TOK, num=1, seed=3)[0]
    engine = ScriptedEngine(TOK)
    agent = MemoryAgent(engine, TOK, chunk_tokens=1500, memory_tokens=300, answer_tokens=64)
    agent.run([long, s])
    finals = [i for i, (problem, kind) in enumerate(engine.log) if kind == "final"]
    short_final = next(i for i in finals if engine.log[i][0] == s.question)
    long_updates = [i for i, (problem, kind) in enumerate(engine.log) if problem == long.question]
    assert short_final < long_updates[5]  # answered while the long document is still being read


def test_n_rollouts_share_one_chunk_stream():
    stream = ChunkStream(iter([[1, 2, 3], [4, 5], [6, 7, 8, 9]]), chunk_tokens=4, readers=2)
    assert stream.next(0) == [1, 2, 3, 4] and stream.next(0) == [5, 6, 7, 8]
    assert len(stream.chunks) == 2  # reader 1 has read neither yet
    assert stream.next(1) == [1, 2, 3, 4] and len(stream.chunks) == 1  # the first chunk is dropped
    assert stream.next(0) == [9] and stream.next(0) is None
    assert stream.next(1) == [5, 6, 7, 8] and stream.next(1) == [9] and stream.next(1) is None


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{42}.") == "42"
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert extract_boxed(r"\boxed{7} and \boxed{broken") == "7"
    assert extract_boxed("no box here") is None


def test_documents_as_text_ids_file_and_iterator(tmp_path):
    text = "line one\nline two\n"
    (tmp_path / "doc.txt").write_text(text)
    want = TOK.encode(text)
    for doc in (text, want, tmp_path / "doc.txt", iter(["line one\n", "line two\n"]), lambda: iter([text])):
        assert [i for p in document_tokens(doc, TOK) for i in p] == want


def test_bad_input_fails_one_sample_and_the_rest_go_on(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    good = make_samples("niah_single", 2000, TOK, num=1)[0]
    samples = [Sample("empty", good.question, "", ["x"]),
               Sample("long-q", "why? " * 100, "text", ["x"]),
               Sample("binary", good.question, tmp_path / "bad.txt", ["x"]),
               good]
    agent = MemoryAgent(ScriptedEngine(TOK), TOK, chunk_tokens=1500, memory_tokens=300, answer_tokens=64,
                        question_tokens=100)
    empty, long_q, binary, ok = agent.run(samples)
    assert empty.error is None and len(empty.conversations) == 1 and empty.conversations[0].is_final
    assert "long-q" in long_q.error and "question_tokens=100" in long_q.error
    assert "bad.txt" in binary.error and "UTF-8" in binary.error
    assert score(good, ok.answer) == 1.0


def test_with_the_real_engine_and_section_first_prefix_sharing():
    from model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64, max_position_embeddings=1024)
    model = Transformer(cfg).init_weights(seed=0).eval()
    sample = make_samples("passkey", 400, TOK, num=1)[0]
    cached = {}
    for template in ("default", "section_first"):
        engine = Engine(model, num_blocks=256, block_size=16)
        agent = MemoryAgent(engine, TOK, chunk_tokens=128, memory_tokens=16, answer_tokens=8,
                            question_tokens=64, template=template)
        trajs = agent.run([sample], n=4, params=SamplingParams(temperature=1.0, seed=0))
        assert all(len(t.conversations) == 5 and t.error is None for t in trajs)
        for t in trajs:
            for c in t.conversations:
                assert len(c.response_ids) == len(c.logprobs) <= 16
        cached[template] = engine.blocks.cache_hits
    assert cached["section_first"] > cached["default"] > 0
