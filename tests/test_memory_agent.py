"""memory_agent.py: chunking, the overwrite loop, independent progression, extraction, bad input.

The plumbing is proven with a scripted stand-in for the LLM (it keeps the lines of a section that
mention the key), so the agent must answer needle tasks at every length whatever a model can do.
"""
import json
import os
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from memory_agent import AgentConfig, ChunkStream, MemoryAgent, document_tokens, main
from rollout import Completion, Engine, SamplingParams
from stub_engine import QueueEngine
from tasks import Sample, extract_boxed, make_samples, score


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


class ScriptedEngine(QueueEngine):
    """The engine's interface around a rule-based policy. Each step answers every queued request,
    like one engine step per turn for the whole batch. It records the order of turns."""

    def __init__(self, tok, max_len=100_000):
        super().__init__(max_len)
        self.tok, self.log = tok, []

    def reply(self, rid, prompt, params):
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
        return Completion(ids, [-0.5] * len(ids), "stop", None, rid)


TOK = CharTokenizer()
SMALL = AgentConfig(chunk_tokens=1500, memory_tokens=300, answer_tokens=64)


@pytest.mark.parametrize("length", [2000, 9000, 60000])
def test_scripted_policy_answers_needles_at_every_length(length):
    samples = make_samples("niah_single", length, TOK, num=3, seed=1)
    agent = MemoryAgent(ScriptedEngine(TOK), TOK, SMALL)
    trajs = agent.run(samples)
    for s, t in zip(samples, trajs):
        doc_tokens = s.meta["doc_tokens"]
        assert t.error is None and t.tokens_read == doc_tokens
        assert len(t.conversations) == -(-doc_tokens // 1500) + 1  # ceil(L / chunk) + 1
        assert t.conversations[-1].is_final and not any(c.is_final for c in t.conversations[:-1])
        assert score(s, t.answer_text) == 1.0, (t.answer, s.answers)


def test_chunks_are_exact_slices_and_prompts_fit():
    sample = make_samples("passkey", 5000, TOK, num=1)[0]
    doc = [i for piece in document_tokens(sample.document, TOK) for i in piece]
    engine = ScriptedEngine(TOK, max_len=4000)
    agent = MemoryAgent(engine, TOK, AgentConfig(chunk_tokens=1000, memory_tokens=500, answer_tokens=64,
                                                 question_tokens=200))
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
    agent = MemoryAgent(engine, TOK, SMALL)
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
    agent = MemoryAgent(ScriptedEngine(TOK), TOK, replace(SMALL, question_tokens=100))
    empty, long_q, binary, ok = agent.run(samples)
    assert empty.error is None and len(empty.conversations) == 1 and empty.conversations[0].is_final
    assert "long-q" in long_q.error and "question_tokens=100" in long_q.error
    assert "bad.txt" in binary.error and "UTF-8" in binary.error
    assert score(good, ok.answer_text) == 1.0


def test_with_the_real_engine_and_section_first_prefix_sharing():
    from model import ModelConfig, Transformer
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64, max_position_embeddings=1024)
    model = Transformer(cfg).init_weights(seed=0).eval()
    sample = make_samples("passkey", 400, TOK, num=1)[0]
    cached = {}
    for template in ("default", "section_first"):
        engine = Engine(model, num_blocks=256, block_size=16)
        agent = MemoryAgent(engine, TOK, AgentConfig(chunk_tokens=128, memory_tokens=16, answer_tokens=8,
                                                   question_tokens=64, template=template))
        trajs = agent.run([sample], n=4, params=SamplingParams(temperature=1.0, seed=0))
        assert all(len(t.conversations) == 5 and t.error is None for t in trajs)
        for t in trajs:
            for c in t.conversations:
                assert len(c.response_ids) == len(c.logprobs) <= 16
        cached[template] = engine.blocks.cache_hits
    assert cached["section_first"] > cached["default"] > 0


def test_final_turn_budget_is_checked_too():
    with pytest.raises(ValueError, match="agent.answer_tokens=3000"):
        MemoryAgent(ScriptedEngine(TOK, max_len=4000), TOK, replace(SMALL, answer_tokens=3000))


def test_agent_config_validates_saves_and_loads(tmp_path):
    for bad, field in ((dict(chunk_tokens=0), "chunk_tokens"), (dict(memory_tokens="many"), "memory_tokens"),
                       (dict(answer_tokens=True), "answer_tokens"), (dict(template="nope"), "template")):
        with pytest.raises(ValueError, match=f"agent.{field}"):
            AgentConfig(**bad)
    assert AgentConfig.load(tmp_path) is None
    tiny = AgentConfig(128, 96, 48, 32, "compact")
    tiny.save(tmp_path)
    assert AgentConfig.load(tmp_path) == tiny
    # a template file travels with the checkpoint: copied in, found again relative to the directory
    (tmp_path / "t.json").write_text(json.dumps({"update": "{problem}|{memory}|{section}", "final": "{problem}|{memory}"}))
    (tmp_path / "ckpt").mkdir()
    AgentConfig(template=str(tmp_path / "t.json")).save(tmp_path / "ckpt")
    (tmp_path / "t.json").unlink()
    loaded = AgentConfig.load(tmp_path / "ckpt")
    assert loaded.template == str(tmp_path / "ckpt" / "agent_template.json")
    assert MemoryAgent(None, TOK, loaded).final.render(problem=[5], memory=[6]) == [5, ord("|") + 2, 6]
    for text, match in (('{"chunk_tokens": 128, "chunks": 3}', "agent.json: unknown key 'chunks'"),
                        ('{"chunk_tokens": "lots"}', "agent.json: 'agent.chunk_tokens' expects int"),
                        ('{"memory_tokens": 0}', "agent.json: 'agent.memory_tokens' must be"),
                        ('{"chunk_tokens": 128', "agent.json: not valid JSON"), ("[1]", "agent.json: expected")):
        (tmp_path / "agent.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            AgentConfig.load(tmp_path)


def test_a_template_is_a_built_in_name_or_a_file():
    with pytest.raises(ValueError, match="template 'nope' is neither a built-in .* nor a file"):
        AgentConfig(template="nope")


@pytest.mark.parametrize("template, match", [
    ({"update": "{problem}{memory}{section}", "finall": "{problem}{memory}"},
     "unknown key 'finall'; did you mean 'final'"),
    ({"update": "{problem}{memory}", "final": "{problem}{memory}"},
     r"'update' lacks the placeholders \['\{section\}'\]"),
    ({"update": "{problem}{memory}{section}", "final": "{question}{memory}"}, "'final' has \\['\\{question\\}'\\]"),
    ({"update": "{problem}{memory}{section}", "final": "\\boxed{} {problem}{memory}"}, "'final' has \\['\\{\\}'\\]"),
    ({"update": "{problem}{memory}{section}"}, "no 'final' prompt"),
    ({"update": "{problem}{memory}{section}", "final": "{problem}{memory} {"}, "'final' has \\['a lone brace'\\]"),
    ({"update": 3, "final": "{problem}{memory}"}, "'update' must be a string")])
def test_template_files_are_refused_by_key(tmp_path, template, match):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(template))
    with pytest.raises(ValueError, match=match):
        AgentConfig(template=str(path))


PIECES = ["{problem}", "{memory}", "{section}", "{question}", "{", "}", "{{", "}}", "text ", "\\boxed{{}}"]


@settings(max_examples=60, deadline=None)
@given(template=st.dictionaries(st.sampled_from(["update", "final", "direct", "empty_memory", "finall", "Update"]),
                                st.lists(st.sampled_from(PIECES), max_size=6).map("".join), max_size=4))
def test_any_template_renders_every_prompt_or_is_refused_by_key(template, tmp_path_factory):
    path = tmp_path_factory.mktemp("tmpl") / "t.json"
    path.write_text(json.dumps(template))
    try:
        agent = MemoryAgent(None, TOK, AgentConfig(template=str(path)))
    except ValueError as e:
        assert str(path) in str(e) and any(f"'{k}'" in str(e) for k in [*template, "update", "final"]), e
        return
    problem, memory, chunk = [7, 7], [8], [9, 9, 9]
    update, final = agent.prompt(problem, memory, chunk), agent.prompt(problem, memory)
    for ids, parts in ((update, (problem, memory, chunk)), (final, (problem, memory))):
        text = ",".join(map(str, ids))
        assert all(",".join(map(str, p)) in text for p in parts)  # every placeholder was filled


class Forgetful(QueueEngine):
    """Writes an empty memory after every section and answers from whatever memory it is shown."""

    def __init__(self):
        super().__init__()
        self.memories = []

    def reply(self, rid, prompt, params):
        text = TOK.decode(prompt)
        self.memories.append(re.search(r"<memory>\n(.*?)\n</memory>", text, re.S).group(1))
        ids = ([] if "<section>" in text else TOK.encode("\\boxed{x}")) + [1]
        return Completion(ids, [0.0] * len(ids), "stop", None, rid)


@pytest.mark.parametrize("keep, shown", [(False, "No previous memory."), (True, "")])
def test_an_empty_memory_the_model_writes_is_kept_empty_when_asked(keep, shown):
    engine = Forgetful()
    agent = MemoryAgent(engine, TOK, replace(SMALL, chunk_tokens=40, keep_empty_memory=keep))
    (t,) = agent.run([Sample("s", "Q?", "x" * 100, ["x"])])
    assert t.memories == ["", "", ""] and t.answer == "x"
    # the first turn has read nothing yet: the placeholder either way (as the release shows it)
    assert engine.memories == ["No previous memory.", shown, shown, shown]


def test_a_template_file_brings_its_own_answer_is_wording(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"update": "U {problem}|{memory}|{section}", "final": "F {problem}|{memory}",
                                "final_answer_is": "A {problem}|{memory}"}))
    for frame, head in (("boxed", "F "), ("answer_is", "A ")):
        agent = MemoryAgent(None, TOK, AgentConfig(template=str(path)), frame=frame)
        assert TOK.decode(agent.prompt(TOK.encode("q"), None)) == f"<user>\n{head}q|No previous memory.\n<assistant>\n"
    built_in = MemoryAgent(None, TOK, AgentConfig(), frame="answer_is")
    assert "Therefore, the answer is" in TOK.decode(built_in.prompt(TOK.encode("q"), TOK.encode("m")))
    assert "Therefore, the answer is" in TOK.decode(built_in.direct_prompt(Sample("s", "q", "doc", []), 10 ** 4))


def _breaks_after(text, error):
    def pieces():
        yield text[:1000]
        yield text[1000:2000]
        raise error
    return pieces


@pytest.mark.parametrize("error", [OSError("disk gone"), RuntimeError("generator bug"), ValueError("bad byte"),
                                   "missing"])
def test_a_document_failing_midway_fails_all_its_rollouts_and_only_them(error, tmp_path):
    good = make_samples("niah_single", 4000, TOK, num=2, seed=4)
    doc = (tmp_path / "nope.txt" if error == "missing"
           else _breaks_after("".join(document_tokens_text(good[0])), error))
    bad = Sample("bad", good[0].question, doc, good[0].answers)
    with_bad = MemoryAgent(ScriptedEngine(TOK), TOK, SMALL).run([good[0], bad, good[1]], n=3)
    alone = MemoryAgent(ScriptedEngine(TOK), TOK, SMALL).run(good, n=3)
    failed = with_bad[3:6]
    message = "nope.txt" if error == "missing" else str(error)
    assert all(t.error and "sample bad" in t.error and message in t.error for t in failed), [t.error for t in failed]
    assert all(t.answer is None and t.answer_text is None for t in failed)
    if error != "missing":  # the first chunk was read before the document broke
        assert all(t.tokens_read == 1500 for t in failed)
    for t, u in zip(with_bad[:3] + with_bad[6:], alone):
        assert t.error is None and t.answer == u.answer and t.answer is not None
        assert [(c.prompt_ids, c.response_ids) for c in t.conversations] == \
               [(c.prompt_ids, c.response_ids) for c in u.conversations]


def document_tokens_text(sample):
    return [TOK.decode(ids) for ids in document_tokens(sample.document, TOK)]


class FaultyEngine(ScriptedEngine):
    """Fails once, at its third step, as an engine bug would."""

    def step(self):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            raise RuntimeError("engine fault")
        return super().step()


def _interrupt(traj):
    if traj.turns == 2:
        raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["interrupt", "engine fault"])
def test_an_escaping_exception_leaves_the_engine_clean(how):
    samples = make_samples("niah_single", 6000, TOK, num=2, seed=5)
    engine = FaultyEngine(TOK) if how == "engine fault" else ScriptedEngine(TOK)
    agent = MemoryAgent(engine, TOK, SMALL)
    with pytest.raises(RuntimeError if how == "engine fault" else KeyboardInterrupt):
        agent.run(samples, n=2, on_turn=_interrupt if how == "interrupt" else None)
    assert not engine.has_unfinished()  # every request of the broken run was aborted
    again = agent.run(samples, n=2)
    fresh = MemoryAgent(ScriptedEngine(TOK), TOK, SMALL).run(samples, n=2)
    assert [(t.answer, t.memories) for t in again] == [(t.answer, t.memories) for t in fresh]
    assert all(score(s, t.answer_text) == 1.0 for s, t in zip([samples[0]] * 2 + [samples[1]] * 2, again))


def test_quickstart_reads_one_document_with_the_checkpoints_settings(tmp_path, capsys):
    from tasks import document_text
    from tokenizer import load_tokenizer
    model_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "tiny")
    tok = load_tokenizer(model_dir)
    sample = make_samples("niah_single", 512, tok, num=1, seed=1)[0]
    (tmp_path / "doc.txt").write_text(document_text(sample))
    argv = ["--model", model_dir, "--document", str(tmp_path / "doc.txt"), "--question", sample.question]
    main(argv)  # chunk 128 from agent.json: the default 5000 would not fit the model's 2048 positions
    out = capsys.readouterr().out
    chunks = -(-sum(map(len, document_tokens(tmp_path / "doc.txt", tok))) // 128)
    assert out.count(f"memory after chunk {chunks} ") == 1 and f"memory after chunk {chunks + 1} " not in out
    assert f"boxed: {sample.answers[0]}" in out  # the shipped agent reads this needle right
    main(argv + ["--agent.chunk_tokens", "64", "--quiet"])
    out = capsys.readouterr().out
    assert "memory after" not in out and f"in {-(-chunks * 128 // 64)} chunks" in out
    for extra, match in ((["--agent.chunk_tokens", "0"], "agent.chunk_tokens"), (["--document", "/no/such"], "no such file"),
                         (["--question", " "], "'question' is required"), (["--tempreature", "1"], "did you mean")):
        with pytest.raises(SystemExit, match=match):
            main(argv + extra)


def test_a_failed_rollout_does_not_hold_its_siblings_chunks():
    # reader 1 fails after its first chunk; reader 0 reads on, and chunks it has read are dropped
    stream = ChunkStream(iter([list(range(40))]), 10, readers=2)
    assert stream.next(0) == list(range(10)) and stream.next(1) == list(range(10))
    stream.done(1)
    for k in range(1, 4):
        assert stream.next(0) == list(range(10 * k, 10 * k + 10))
        assert len(stream.chunks) <= 1


class RecordingEngine(QueueEngine):
    """Answers every request with reply(prompt, params) -> ids, and records the requests."""

    def __init__(self, reply, max_len=100_000):
        super().__init__(max_len)
        self.replies, self.requests = reply, []

    def reply(self, rid, prompt, params):
        self.requests.append((prompt, params))
        ids = self.replies(prompt, params)
        return Completion(ids, [-1.0] * len(ids), "stop", None, rid)


def test_the_memory_is_the_reply_without_stop_and_pad_ids():
    reply = [TOK.pad_id] + TOK.encode("ab") + [TOK.eos_id]  # every turn answers: pad, "ab", stop
    engine = RecordingEngine(lambda prompt, params: reply)
    agent = MemoryAgent(engine, TOK, AgentConfig(chunk_tokens=4, memory_tokens=8, answer_tokens=5))
    t = agent.run([Sample("s", "q?", "abcdefgh", [])])[0]
    q, ab = TOK.encode("q?"), TOK.encode("ab")
    # two chunks of exactly 4 tokens, then the final turn; the memory spliced in is "ab" alone
    assert [c.prompt_ids for c in t.conversations] == [
        agent.prompt(q, [], TOK.encode("abcd")), agent.prompt(q, ab, TOK.encode("efgh")), agent.prompt(q, ab)]
    assert all(c.response_ids == reply for c in t.conversations)
    assert (t.turns, t.tokens_generated, t.tokens_read, t.memories, t.answer_text) == (3, 12, 8, ["ab", "ab"], "ab")
    # each turn's cap, and the tokenizer's stop ids unless the params name their own
    assert [(p.max_new_tokens, p.stop_token_ids) for _, p in engine.requests] == [(8, (1,)), (8, (1,)), (5, (1,))]
    engine.requests.clear()
    agent.run([Sample("s", "q?", "abcd", [])], params=SamplingParams(stop_token_ids=(7,)))
    assert [p.stop_token_ids for _, p in engine.requests] == [(7,), (7,)]


def test_the_stream_reads_only_the_pieces_a_chunk_needs():
    pulled = []

    def pieces():
        for p in ([1, 2], [3, 4], [5, 6], [7]):
            pulled.append(p)
            yield p
    stream = ChunkStream(pieces(), chunk_tokens=4, readers=1)
    assert stream.next(0) == [1, 2, 3, 4] and len(pulled) == 2
    assert stream.next(0) == [5, 6, 7] and stream.next(0) is None and len(pulled) == 4


def test_a_question_of_exactly_question_tokens_is_accepted():
    agent = MemoryAgent(RecordingEngine(lambda prompt, params: [TOK.eos_id]), TOK,
                        AgentConfig(chunk_tokens=4, memory_tokens=8, answer_tokens=8, question_tokens=5))
    fits, over = agent.run([Sample("fits", "12345", "doc", []), Sample("over", "123456", "doc", [])])
    assert fits.error is None and len(fits.conversations) == 2
    assert "question of 6 tokens exceeds agent.question_tokens=5" in over.error


def test_the_budget_check_sums_every_part_of_a_prompt():
    # one token per character. Chat frame "<user>\n" "\n" "<assistant>\n": 20 tokens. Compact template text:
    # update "Problem: " "\nMemory: " "\nSection: " "\nNew memory:" = 40, final "Problem: " "\nMemory: "
    # "\nAnswer:" = 26. The old memory in a prompt is at most max(memory_tokens 3, len("none") 4) = 4.
    #   update: 20 + question 10 + old memory 4 + 40 + chunk 100 + new memory 3 = 177
    #   final:  20 + question 10 + old memory 4 + 26 + answer 200             = 260
    cfg = AgentConfig(chunk_tokens=100, memory_tokens=3, answer_tokens=5, question_tokens=10, template="compact")
    MemoryAgent(ScriptedEngine(TOK, max_len=177), TOK, cfg)
    with pytest.raises(ValueError, match=r"chunk_tokens=100 .* \(177 tokens in all\) exceed the model's 176 positions"):
        MemoryAgent(ScriptedEngine(TOK, max_len=176), TOK, cfg)
    small_cache = ScriptedEngine(TOK, max_len=1000)
    small_cache.num_blocks, small_cache.block_size = 11, 16  # 176 tokens: no update turn would fit it
    with pytest.raises(ValueError, match=r"\(177 tokens in all\) exceed the engine's KV cache \(11 blocks of 16\)"):
        MemoryAgent(small_cache, TOK, cfg)
    cfg = replace(cfg, answer_tokens=200)
    MemoryAgent(ScriptedEngine(TOK, max_len=260), TOK, cfg)
    with pytest.raises(ValueError, match=r"answer_tokens=200 .* \(260 tokens in all\) exceed the model's 259 positions"):
        MemoryAgent(ScriptedEngine(TOK, max_len=259), TOK, cfg)
    # the longest update prompt (empty memory, full question and chunk) plus its output is the 177
    agent = MemoryAgent(None, TOK, cfg)
    assert len(agent.prompt(TOK.encode("q" * 10), [], [5] * 100)) + 3 == 177


def test_direct_prompt_cuts_the_middle_of_the_document_to_fit():
    # compact direct text "Text: " "\nProblem: " "\nAnswer:" = 24 tokens, chat frame 20, question 2:
    # the document gets max_prompt_tokens - 46 tokens, its head and its tail (the tail the odd one)
    agent = MemoryAgent(None, TOK, AgentConfig(template="compact"))
    sample = Sample("s", "q?", "0123456789", [])
    for max_prompt, text in ((60, "0123456789"), (56, "0123456789"), (55, "012356789"), (52, "012789"), (46, "")):
        prompt = agent.direct_prompt(sample, max_prompt)
        assert TOK.decode(prompt) == f"<user>\nText: {text}\nProblem: q?\nAnswer:\n<assistant>\n"
    with pytest.raises(ValueError, match="question alone exceeds 45 tokens"):
        agent.direct_prompt(sample, 45)


def test_a_question_that_cannot_be_encoded_fails_its_own_sample():
    class Strict(CharTokenizer):
        def encode(self, text):
            if "\ud800" in text:
                raise ValueError("text holds a lone surrogate")
            return super().encode(text)
    tok = Strict()
    good = Sample("good", "What is the magic number for lamp?", "doc", ["x"])
    bad = Sample("bad", "What is the magic number for \ud800?", "doc", ["x"])
    ok, failed = MemoryAgent(ScriptedEngine(tok), tok, SMALL).run([good, bad])
    assert ok.error is None and "sample bad: text holds a lone surrogate" in failed.error


def test_a_document_file_that_is_not_utf8_names_the_byte(tmp_path):
    (tmp_path / "doc.txt").write_bytes(b"a" * 100_000 + b"\n" + b"bc\xff")
    with pytest.raises(ValueError, match="not UTF-8 text .* at byte 100003"):
        list(document_tokens(tmp_path / "doc.txt", TOK))
