"""The memory agent: read a document of any length chunk by chunk into a bounded memory.

For each trajectory (a sample, rolled out n times):
    memory = "" ; for chunk in document:  memory = LLM(update_template(problem, memory, chunk))
    answer = LLM(final_template(problem, memory))   -> the last \\boxed{...} is the prediction
Each call is one user message in the model's chat template, and its whole output overwrites the
memory, so every prompt stays under a fixed budget however long the document is.

Everything is token ids: the document is tokenized once (lazily, piece by piece), chunks are
token slices, the template's text pieces are tokenized once, and the memory the model wrote is
spliced back as the ids it generated. Trajectories advance independently through the engine:
when one turn finishes, that trajectory's next turn is queued at once.
"""
import json
import os
import re
from collections import deque
from dataclasses import dataclass, field

from rollout import SamplingParams
from tasks import Sample, document_pieces

# The paper's structure, in our own words. {problem}, {memory} and {section} mark where the ids go.
TEMPLATES = {
    "default": {
        "update": ("You are reading a long text one section at a time in order to solve a problem. "
                   "Below are the problem, your memory of the sections read so far, and a new section. "
                   "Rewrite the memory: keep every detail from the old memory that helps solve the problem "
                   "and add what the new section says that helps.\n\n"
                   "<problem>\n{problem}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\n"
                   "<section>\n{section}\n</section>\n\nUpdated memory:\n"),
        "final": ("You have read a long text and kept a memory of it. Solve the problem from the memory "
                  "alone and put the final answer in \\boxed{{}}.\n\n"
                  "<problem>\n{problem}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\nAnswer:\n"),
        "direct": ("Read the text and solve the problem; put the final answer in \\boxed{{}}.\n\n"
                   "<text>\n{section}\n</text>\n\n<problem>\n{problem}\n</problem>\n\nAnswer:\n"),
        "empty_memory": "No previous memory.",
    },
}
# The section before the memory: the n rollouts of a question then share the KV of the template
# head, the problem and the chunk through the prefix cache; only their memories differ.
TEMPLATES["section_first"] = dict(TEMPLATES["default"], update=(
    "You are reading a long text one section at a time in order to solve a problem. "
    "Below are the problem, a new section, and your memory of the sections read before it. "
    "Rewrite the memory: keep every detail from the old memory that helps solve the problem "
    "and add what the new section says that helps.\n\n"
    "<problem>\n{problem}\n</problem>\n\n<section>\n{section}\n</section>\n\n"
    "<memory>\n{memory}\n</memory>\n\nUpdated memory:\n"))
# A few tokens of frame for a model trained from scratch (the embedded tiny agent): every token of
# template is compute spent on text that carries no information.
TEMPLATES["compact"] = {
    "update": "Problem: {problem}\nMemory: {memory}\nSection: {section}\nNew memory:",
    "final": "Problem: {problem}\nMemory: {memory}\nAnswer:",
    "direct": "Text: {section}\nProblem: {problem}\nAnswer:",
    "empty_memory": "none",
}


def load_template(template):
    """A built-in name, a dict, or a JSON file with keys update, final (direct, empty_memory optional)."""
    if isinstance(template, dict):
        t = dict(TEMPLATES["default"], **template)
    elif template in TEMPLATES:
        t = TEMPLATES[template]
    elif os.path.isfile(str(template)):
        with open(template) as f:
            try:
                t = dict(TEMPLATES["default"], **json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{template}: not valid JSON ({e})") from None
    else:
        raise ValueError(f"template '{template}' is neither a built-in {sorted(TEMPLATES)} nor a file")
    for key, fields in (("update", ("{problem}", "{memory}", "{section}")), ("final", ("{problem}", "{memory}"))):
        missing = [f for f in fields if f not in t[key]]
        if missing:
            raise ValueError(f"template '{key}' lacks the placeholders {missing}")
    return t


class SplicedTemplate:
    """A template cut at its placeholders, text pieces tokenized once: render(**ids) -> ids."""

    def __init__(self, text, tokenizer):
        parts = re.split(r"(\{problem\}|\{memory\}|\{section\})", text)
        self.parts = [p[1:-1] if p in ("{problem}", "{memory}", "{section}")
                      else tokenizer.encode(p.replace("{{", "{").replace("}}", "}"))
                      for p in parts if p]
        self.num_text_tokens = sum(len(p) for p in self.parts if isinstance(p, list))

    def render(self, **ids):
        out = []
        for p in self.parts:
            out += ids[p] if isinstance(p, str) else p
        return out


def extract_boxed(text):
    """The content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"):i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try the one before
    return None


# --------------------------------------------------------------------------------------------
# documents as chunk streams

def document_tokens(document, tokenizer):
    """Yield the document's token ids piece by piece. `document`: text, a list of ids, a file
    path (os.PathLike, read line by line), a zero-argument callable returning an iterator of text
    pieces (tasks.Sample), or an iterator of text pieces."""
    if isinstance(document, str):
        yield tokenizer.encode(document)
    elif isinstance(document, list):
        yield document
    elif isinstance(document, os.PathLike):
        try:
            with open(document, encoding="utf-8") as f:
                for line in f:
                    yield tokenizer.encode(line)
        except UnicodeDecodeError as e:
            raise ValueError(f"{document}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        pieces = document() if callable(document) else document
        cache = {}  # generated documents repeat a few thousand distinct pieces millions of times
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = tokenizer.encode(piece)
                if len(cache) < 65536:
                    cache[piece] = ids
            yield ids


class ChunkStream:
    """One document's chunks for its n rollouts: tokenized once, lazily, and each chunk dropped as
    soon as the slowest rollout has read it, so memory does not grow with the document."""

    def __init__(self, token_pieces, chunk_tokens, readers):
        self.pieces = token_pieces
        self.chunk_tokens = chunk_tokens
        self.buffer: list[int] = []  # tokens read; those from `start` on are not yet in a chunk
        self.start = 0
        self.chunks: deque = deque()  # chunks [first, first + len)
        self.first = 0
        self.exhausted = False
        self.position = [0] * readers  # next chunk index of each rollout

    def _fill(self, index):
        while self.first + len(self.chunks) <= index and not self.exhausted:
            while len(self.buffer) - self.start < self.chunk_tokens:
                piece = next(self.pieces, None)
                if piece is None:
                    self.exhausted = True
                    break
                if self.start:  # compact before growing (a whole-text document is one big piece)
                    del self.buffer[:self.start]
                    self.start = 0
                self.buffer += piece
            if len(self.buffer) > self.start:
                self.chunks.append(self.buffer[self.start:self.start + self.chunk_tokens])
                self.start += len(self.chunks[-1])

    def next(self, reader):
        """The reader's next chunk, or None at the end of the document."""
        index = self.position[reader]
        self._fill(index)
        if index >= self.first + len(self.chunks):
            return None
        chunk = self.chunks[index - self.first]
        self.position[reader] += 1
        while self.chunks and min(self.position) > self.first:
            self.chunks.popleft()
            self.first += 1
        return chunk


# --------------------------------------------------------------------------------------------
# trajectories

@dataclass
class Conversation:
    prompt_ids: list[int]
    response_ids: list[int]  # as generated, the stop token included
    logprobs: list[float]  # behaviour log-prob of each response token
    turn: int
    is_final: bool
    finish_reason: str  # "stop" | "length" (a memory update that hit the cap)


@dataclass
class Trajectory:
    sample_id: str
    rollout: int
    conversations: list[Conversation] = field(default_factory=list)
    memories: list[str] = field(default_factory=list)  # the memory text after each update
    answer_text: str | None = None
    answer: str | None = None  # content of the last \boxed{}; None if there is none
    tokens_read: int = 0
    tokens_generated: int = 0
    turns: int = 0
    error: str | None = None


class _Rollout:
    """The running state of one trajectory."""

    def __init__(self, trajectory, problem_ids, stream, reader, sample_index):
        self.traj = trajectory
        self.problem = problem_ids
        self.stream, self.reader = stream, reader
        self.sample_index = sample_index
        self.memory: list[int] = []
        self.prompt = None
        self.is_final = False


class MemoryAgent:
    def __init__(self, engine, tokenizer, chunk_tokens=5000, memory_tokens=1024, answer_tokens=1024,
                 question_tokens=1024, template="default", keep_conversations=True, progress=False):
        """keep_conversations=False drops each turn's ids once used (evaluation of very long
        documents); training needs them."""
        self.engine, self.tok = engine, tokenizer
        self.chunk_tokens, self.memory_tokens = chunk_tokens, memory_tokens
        self.answer_tokens, self.question_tokens = answer_tokens, question_tokens
        t = load_template(template)
        self.update = SplicedTemplate(t["update"], tokenizer)
        self.final = SplicedTemplate(t["final"], tokenizer)
        self.direct = SplicedTemplate(t["direct"], tokenizer)
        self.empty_memory = tokenizer.encode(t["empty_memory"])
        self.keep_conversations = keep_conversations
        self.progress = progress
        self.stop_ids = tuple(tokenizer.stop_ids)
        # the chat wrapper's own tokens (role headers, default system prompt)
        self.wrapper_tokens = len(self.tok.apply_chat_template([{"role": "user", "content": []}]))
        budget = (self.wrapper_tokens + self.update.num_text_tokens + question_tokens + chunk_tokens
                  + 2 * memory_tokens)
        if engine is not None and budget > engine.max_len:  # no engine: building prompts only (SFT)
            raise ValueError(f"chunk_tokens={chunk_tokens} + 2 x memory_tokens={memory_tokens} + "
                             f"question_tokens={question_tokens} + template ({budget} in all) exceed the "
                             f"model's {engine.max_len} positions")

    def _wrap(self, content_ids):
        return self.tok.apply_chat_template([{"role": "user", "content": content_ids}])

    def prompt(self, problem, memory, chunk=None):
        """The prompt ids of a memory update (chunk given) or of the final answer (chunk None)."""
        memory = memory or self.empty_memory
        if chunk is None:
            return self._wrap(self.final.render(problem=problem, memory=memory))
        return self._wrap(self.update.render(problem=problem, memory=memory, section=chunk))

    def run(self, samples: list[Sample], n=1, params: SamplingParams = SamplingParams()) -> list[Trajectory]:
        """Roll out every sample n times; trajectories come back grouped by sample, rollout order."""
        out, live = [], []
        for i, s in enumerate(samples):
            trajs = [Trajectory(s.id, k) for k in range(n)]
            out += trajs
            problem = self.tok.encode(s.question)
            if len(problem) > self.question_tokens:
                for t in trajs:
                    t.error = (f"sample {s.id}: question of {len(problem)} tokens exceeds "
                               f"question_tokens={self.question_tokens}")
                continue
            stream = ChunkStream(document_tokens(s.document, self.tok), self.chunk_tokens, n)
            live += [_Rollout(t, problem, stream, k, i) for k, t in enumerate(trajs)]

        pending = {}  # engine request id -> rollout
        for r in live:
            self._submit(r, params, pending)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(live), desc="trajectories", unit="traj")
        while pending:
            for c in self.engine.step():
                r = pending.pop(c.request_id)
                self._finish_turn(r, c)
                if r.traj.answer_text is None and r.traj.error is None:
                    self._submit(r, params, pending)
                elif bar:
                    bar.update(1)
                    s = self.engine.stats
                    bar.set_postfix(tok_s=f"{(s['prefill_tokens'] + s['decode_tokens']) / max(s['prefill_s'] + s['decode_s'], 1e-9):.0f}")
        if bar:
            bar.close()
        return out

    def _submit(self, r, params, pending):
        """Queue the rollout's next turn: a memory update if a chunk remains, else the final answer."""
        try:
            chunk = r.stream.next(r.reader)
        except ValueError as e:  # an unreadable document: this sample fails, the rest go on
            r.traj.error = f"sample {r.traj.sample_id}: {e}"
            return
        if chunk is not None:
            r.traj.tokens_read += len(chunk)
        r.is_final = chunk is None
        r.prompt = self.prompt(r.problem, r.memory, chunk)
        max_new = self.answer_tokens if r.is_final else self.memory_tokens
        seed = None if params.seed is None else hash((params.seed, r.sample_index, r.reader, r.traj.turns)) & 0x7FFFFFFF
        sp = SamplingParams(params.temperature, params.top_p, params.top_k, max_new,
                            tuple(params.stop_token_ids) or self.stop_ids, seed)
        rid = self.engine.add_request(r.prompt, sp)
        pending[rid] = r

    def _finish_turn(self, r, c):
        t = r.traj
        if c.finish_reason == "error":
            t.error = f"sample {t.sample_id}: {c.error}"
            return
        ids = [i for i in c.token_ids if i not in self.stop_ids and i != self.tok.pad_id]
        if self.keep_conversations:
            t.conversations.append(Conversation(r.prompt, c.token_ids, c.logprobs, t.turns, r.is_final,
                                                c.finish_reason))
        t.turns += 1
        t.tokens_generated += len(c.token_ids)
        text = self.tok.decode(ids)
        if r.is_final:
            t.answer_text, t.answer = text, extract_boxed(text)
        else:
            r.memory = ids
            t.memories.append(text)

    def direct_prompt(self, sample: Sample, max_prompt_tokens):
        """The whole document in one prompt (the baseline without memory), cut in the middle to fit."""
        problem = self.tok.encode(sample.question)
        doc = [i for piece in document_tokens(sample.document, self.tok) for i in piece]
        room = max_prompt_tokens - self.wrapper_tokens - self.direct.num_text_tokens - len(problem)
        if room < 0:
            raise ValueError(f"sample {sample.id}: the question alone exceeds {max_prompt_tokens} tokens")
        if len(doc) > room:
            doc = doc[:room // 2] + doc[len(doc) - (room - room // 2):]
        return self._wrap(self.direct.render(problem=problem, section=doc))
