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
import math
import os
import re
import sys
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from model import TINY_CONFIGS, build_model, check_model_name
from rollout import Engine, SamplingParams, derive_seed
from run_outputs import write_file
from settings import (INT64, TEMPERATURE, TOP_P, SettingError, Settings, at_least, build, nearest, one_of, option,
                      read_json, within)
from tasks import FRAMES, Sample, extract_answer_is, extract_boxed
from tokenizer import load_tokenizer

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


# The release's evaluation frame (eval.py --frame answer_is): the final turn ends its reply with
# "Therefore, the answer is ...". Kept out of TEMPLATES, whose text trains the tiny tokenizer.
ANSWER_IS = {
    "final_answer_is": ("You have read a long text and kept a memory of it. Solve the problem from the "
                        "memory alone, and end your reply with \"Therefore, the answer is\" followed by the "
                        "answer.\n\n<problem>\n{problem}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\nAnswer:\n"),
    "direct_answer_is": ("Read the text and solve the problem, and end your reply with \"Therefore, the answer "
                         "is\" followed by the answer.\n\n<text>\n{section}\n</text>\n\n"
                         "<problem>\n{problem}\n</problem>\n\nAnswer:\n"),
}
PLACEHOLDERS = {"update": ("problem", "memory", "section"), "final": ("problem", "memory"),
                "direct": ("problem", "section"), "empty_memory": (), "final_answer_is": ("problem", "memory"),
                "direct_answer_is": ("problem", "section")}


def load_template(template):
    """A built-in name, a dict, or a JSON file with the keys update and final (direct, empty_memory,
    final_answer_is and direct_answer_is optional, else the default's: the last two are the answer-is
    frame's final and direct turns). Each prompt holds exactly its placeholders (PLACEHOLDERS);
    literal braces are doubled, as in str.format."""
    if isinstance(template, dict):
        where, given = "template", template
    elif template in TEMPLATES:
        return {**ANSWER_IS, **TEMPLATES[template]}
    elif isinstance(template, str) and os.path.isfile(template):
        where, given = template, read_json(template, "a JSON object of prompts")
    else:
        raise SettingError(f"template '{template}' is neither a built-in {sorted(TEMPLATES)} nor a file")
    for key, text in given.items():
        if key not in PLACEHOLDERS:
            raise SettingError(f"{where}: unknown key '{key}'{nearest(key, list(PLACEHOLDERS))}")
        if not isinstance(text, str):
            raise SettingError(f"{where}: '{key}' must be a string, got {text!r}")
        names = re.findall(r"\{(\w*)\}", text.replace("{{", "").replace("}}", ""))
        stray = re.sub(r"\{\w*\}", "", text.replace("{{", "").replace("}}", ""))
        wrong = sorted("{" + n + "}" for n in set(names) - set(PLACEHOLDERS[key]))
        wrong += ["a lone brace"] if "{" in stray or "}" in stray else []
        missing = [p for p in PLACEHOLDERS[key] if p not in names]
        if wrong or missing:
            raise SettingError(f"{where}: '{key}' " + (f"has {wrong} (literal braces are doubled) " if wrong else "")
                               + (f"lacks the placeholders {['{' + m + '}' for m in missing]}" if missing else ""))
    for key in ("update", "final"):
        if key not in given:
            raise SettingError(f"{where}: no '{key}' prompt")
    return {**ANSWER_IS, **TEMPLATES["default"], **given}


@dataclass
class AgentConfig(Settings):
    """The agent's token budgets and template: how a checkpoint reads. Saved beside config.json as
    agent.json so a checkpoint is evaluated the way it was trained."""
    section: ClassVar[str] = "agent."
    chunk_tokens: int = option(5000, at_least(1))  # document tokens read per memory update
    memory_tokens: int = option(1024, at_least(1))  # cap on each new memory (the prompt holds the old one too)
    answer_tokens: int = option(1024, at_least(1))  # cap on the final answer
    question_tokens: int = option(1024, at_least(1))  # longest question accepted
    template: str = "default"  # a name in TEMPLATES or a JSON file (see load_template)
    keep_empty_memory: bool = False  # an empty memory the model writes is shown empty (the release), not as
    # the template's empty_memory placeholder (which always stands for "nothing read yet")

    def check_together(self):
        try:
            load_template(self.template)
        except SettingError as e:
            raise SettingError(f"agent.template: {e}") from None

    def save(self, model_dir, outputs=None):
        """Write model_dir/agent.json; a template file is copied in beside it (agent_template.json)."""
        cfg = asdict(self)
        if self.template not in TEMPLATES:
            cfg["template"] = "agent_template.json"
            write_file(os.path.join(model_dir, cfg["template"]), json.dumps(load_template(self.template), indent=1))
        write_file(os.path.join(model_dir, "agent.json"), json.dumps(cfg, indent=1) + "\n")

    @classmethod
    def load(cls, model_dir):
        """model_dir/agent.json -> AgentConfig (absent keys take their defaults), or None if there is
        none. A template path in it is relative to model_dir."""
        path = os.path.join(model_dir, "agent.json")
        if not os.path.isfile(path):
            return None
        raw = read_json(path, "a JSON object of agent settings")
        if isinstance(raw.get("template"), str) and raw["template"] not in TEMPLATES:
            raw["template"] = os.path.join(model_dir, raw["template"])
        return build(cls, raw, path)


class SplicedTemplate:
    """A template cut at its placeholders, text pieces tokenized once: render(**ids) -> ids."""

    def __init__(self, text, tokenizer):
        self.parts, piece = [], ""  # token lists of text, and placeholder names
        for p in re.split(r"(\{\{|\}\}|\{problem\}|\{memory\}|\{section\})", text):  # left to right, as format
            if p in ("{problem}", "{memory}", "{section}"):
                self.parts += [tokenizer.encode(piece), p[1:-1]] if piece else [p[1:-1]]
                piece = ""
            else:
                piece += {"{{": "{", "}}": "}"}.get(p, p)
        self.parts += [tokenizer.encode(piece)] if piece else []
        self.num_text_tokens = sum(len(p) for p in self.parts if isinstance(p, list))

    def render(self, **ids):
        return [i for p in self.parts for i in (ids[p] if isinstance(p, str) else p)]


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
        with open(document, "rb") as f:
            offset = 0
            for raw in f:  # a line break never falls inside a UTF-8 character
                try:
                    yield tokenizer.encode(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{document}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None
                offset += len(raw)
    else:
        pieces = document() if callable(document) else document
        cache = {}  # generated documents repeat a few thousand distinct pieces millions of times
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = tokenizer.encode(piece)
                if len(cache) < 65536:  # pragma: no mutate  a cache's size cap, off by one entry
                    cache[piece] = ids
            yield ids


class ChunkStream:
    """One document's chunks for its n rollouts: tokenized once, lazily, and each chunk dropped as
    soon as the slowest rollout has read it, so memory does not grow with the document. A document
    that fails while being read fails for every reader: `error` is kept and raised to each."""

    def __init__(self, token_pieces, chunk_tokens, readers):
        self.pieces = token_pieces
        self.chunk_tokens = chunk_tokens
        self.buffer: list[int] = []  # tokens read; those from `start` on are not yet in a chunk
        self.start = 0
        self.chunks: deque = deque()  # chunks [first, first + len)
        self.first = 0
        self.exhausted = False
        self.error: str | None = None
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

    def done(self, reader):
        """The reader stops early (its rollout failed): the others no longer wait for it."""
        self.position[reader] = math.inf

    def next(self, reader):
        """The reader's next chunk, or None at the end of the document; ValueError if it failed."""
        index = self.position[reader]
        if self.error is None:
            try:
                self._fill(index)
            except Exception as e:  # whatever the document's source raises (OSError, a generator's bug)
                self.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        if self.error is not None:
            raise ValueError(self.error)
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
    answer: str | None = None  # the prediction the frame extracts (the last \boxed{}'s content); None if none
    tokens_read: int = 0
    tokens_generated: int = 0
    turns: int = 0
    error: str | None = None


@dataclass
class _Rollout:
    """The running state of one trajectory."""
    traj: Trajectory
    problem: list[int]
    stream: ChunkStream
    reader: int  # rollout index: the stream's reader, and a seed coordinate
    sample_index: int
    memory: list[int] | None = None  # None until the model writes one
    prompt: list[int] | None = None
    is_final: bool = False


class MemoryAgent:
    def __init__(self, engine, tokenizer, agent: AgentConfig | None = None, keep_conversations=True,
                 progress=False, frame="boxed"):
        """agent: budgets and template (None: AgentConfig()). engine=None only builds prompts (SFT
        rows). keep_conversations=False drops each turn's ids once used (evaluation of very long
        documents); training needs them. frame (tasks.FRAMES): how the final and direct turns ask
        for the answer, and what Trajectory.answer extracts from it."""
        self.engine, self.tok = engine, tokenizer
        self.cfg = agent = agent or AgentConfig()
        assert frame in FRAMES, frame
        t = load_template(agent.template)
        suffix = "" if frame == "boxed" else "_" + frame
        self.update = SplicedTemplate(t["update"], tokenizer)
        self.final = SplicedTemplate(t["final" + suffix], tokenizer)
        self.direct = SplicedTemplate(t["direct" + suffix], tokenizer)
        self.extract = extract_boxed if frame == "boxed" else extract_answer_is
        self.empty_memory = tokenizer.encode(t["empty_memory"].replace("{{", "{").replace("}}", "}"))
        self.keep_conversations = keep_conversations
        self.progress = progress
        self.stop_ids = tuple(tokenizer.stop_ids)
        # the chat wrapper's own tokens (role headers, default system prompt)
        self.wrapper_tokens = len(self.tok.apply_chat_template([{"role": "user", "content": []}]))
        if engine is not None:
            kv = engine.num_blocks * engine.block_size
            self._check_budget(min(engine.max_len, kv), f"the model's {engine.max_len} positions" if kv >=
                               engine.max_len else f"the engine's KV cache ({engine.num_blocks} blocks of {engine.block_size})")

    def _check_budget(self, limit, room):  # every turn's prompt plus its longest output fits `room` (limit tokens)
        c = self.cfg
        memory = max(c.memory_tokens, len(self.empty_memory))  # the old memory in a prompt
        frame = self.wrapper_tokens + c.question_tokens + memory
        turns = ((self.update, c.chunk_tokens + c.memory_tokens,
                  f"agent.chunk_tokens={c.chunk_tokens} + 2 x agent.memory_tokens={c.memory_tokens}"),
                 (self.final, c.answer_tokens,
                  f"agent.answer_tokens={c.answer_tokens} + agent.memory_tokens={c.memory_tokens}"))
        for template, new, what in turns:
            need = frame + template.num_text_tokens + new
            if need > limit:
                raise SettingError(f"{what} + agent.question_tokens={c.question_tokens} + template and chat frame "
                                   f"({need} tokens in all) exceed {room}")

    def _wrap(self, content_ids):
        return self.tok.apply_chat_template([{"role": "user", "content": content_ids}])

    def prompt(self, problem, memory, chunk=None):
        """The prompt ids of a memory update (chunk given) or of the final answer (chunk None). memory
        None (nothing written yet) shows the placeholder; so does an empty one unless keep_empty_memory."""
        if memory is None or not (memory or self.cfg.keep_empty_memory):
            memory = self.empty_memory
        template = self.final if chunk is None else self.update
        return self._wrap(template.render(problem=problem, memory=memory, section=chunk))

    def run(self, samples: list[Sample], n=1, params: SamplingParams = SamplingParams(),
            on_turn=None) -> list[Trajectory]:
        """Roll out every sample n times -> trajectories grouped by sample, in rollout order. A sample
        whose question is too long or whose document fails fails alone: its n trajectories carry the
        error. on_turn(trajectory) follows each finished turn. An exception that escapes (an interrupt,
        an engine fault) first aborts this run's requests, so the engine is clean for the next run."""
        assert n >= 1, n
        out, live = [], []
        for i, s in enumerate(samples):
            trajs = [Trajectory(s.id, k) for k in range(n)]
            out += trajs
            try:
                problem = self.tok.encode(s.question)
                if len(problem) > self.cfg.question_tokens:
                    raise ValueError(f"question of {len(problem)} tokens exceeds agent.question_tokens="
                                     f"{self.cfg.question_tokens}")
            except ValueError as e:  # too long, or text that is not valid Unicode: this sample fails alone
                for t in trajs:
                    t.error = f"sample {s.id}: {e}"
                continue
            stream = ChunkStream(document_tokens(s.document, self.tok), self.cfg.chunk_tokens, n)
            live += [_Rollout(t, problem, stream, k, i) for k, t in enumerate(trajs)]
        pending = {}  # engine request id -> rollout
        try:
            self._loop(live, params, pending, on_turn)
        except BaseException:
            for rid in pending:
                self.engine.abort(rid)
            raise
        return out

    def _loop(self, live, params, pending, on_turn):
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(live), desc="trajectories", unit="traj")
        try:
            for r in live:
                if not self._submit(r, params, pending) and bar:
                    bar.update(1)
            while pending:
                done = self.engine.step()
                if not done and not self.engine.has_unfinished():
                    raise RuntimeError(f"engine idle with {len(pending)} of this run's requests outstanding")
                for c in done:
                    r = pending.pop(c.request_id, None)
                    if r is None:  # aborted by an earlier, interrupted run after the engine had finished it
                        continue
                    self._finish_turn(r, c)
                    if on_turn:
                        on_turn(r.traj)
                    if r.traj.answer_text is None and r.traj.error is None and self._submit(r, params, pending):
                        continue
                    if bar:
                        bar.update(1)
                        read = sum(x.traj.tokens_read for x in live)
                        bar.set_postfix(doc_tok_s=f"{read / max(bar.format_dict['elapsed'], 1e-9):.0f}")
        finally:
            if bar:
                bar.close()

    def _submit(self, r, params, pending):
        """Queue the rollout's next turn: a memory update if a chunk remains, else the final answer.
        False if the rollout fails instead: its document could not be read (by it or a sibling)."""
        try:
            chunk = r.stream.next(r.reader)
        except ValueError as e:
            r.traj.error = f"sample {r.traj.sample_id}: {e}"
            return False
        if chunk is not None:
            r.traj.tokens_read += len(chunk)
        r.is_final = chunk is None
        r.prompt = self.prompt(r.problem, r.memory, chunk)
        seed = None if params.seed is None else derive_seed(params.seed, r.sample_index, r.reader, r.traj.turns)
        sp = replace(params, max_new_tokens=self.cfg.answer_tokens if r.is_final else self.cfg.memory_tokens,
                     stop_token_ids=tuple(params.stop_token_ids) or self.stop_ids, seed=seed)
        pending[self.engine.add_request(r.prompt, sp)] = r
        return True

    def _finish_turn(self, r, c):
        t = r.traj
        if c.finish_reason == "error":
            t.error = f"sample {t.sample_id}: {c.error}"
            r.stream.done(r.reader)
            return
        ids = [i for i in c.token_ids if i not in self.stop_ids and i != self.tok.pad_id]
        if self.keep_conversations:
            t.conversations.append(Conversation(r.prompt, c.token_ids, c.logprobs, t.turns, r.is_final,
                                                c.finish_reason))
        t.turns += 1
        t.tokens_generated += len(c.token_ids)
        text = self.tok.decode(ids)
        if r.is_final:
            t.answer_text, t.answer = text, self.extract(text)
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
        if len(doc) > room:  # pragma: no mutate  cutting a document of exactly room tokens leaves it whole
            doc = doc[:room // 2] + doc[len(doc) - (room - room // 2):]
        return self._wrap(self.direct.render(problem=problem, section=doc))


# --------------------------------------------------------------------------------------------
# command line: the model settings (shared with eval.py) and the one-document quickstart

def agent_json(model):
    """The settings a checkpoint directory's agent.json gives, under a run's file and flags."""
    saved = AgentConfig.load(model) if isinstance(model, str) and os.path.isdir(model) else None
    return {"agent": asdict(saved)} if saved else {}


@dataclass
class ModelSettings(Settings):
    """A checkpoint to load, and how it reads as a memory agent (its agent.json under the flags)."""
    model: str = ""  # a HF checkpoint directory, or a tiny config name (random weights)
    tokenizer: str = ""  # a tokenizer file or directory (default: the model directory)
    dtype: str = option("", one_of("", "bfloat16", "float32"))  # default: bfloat16 on cuda, float32 on cpu
    device: str = ""  # default: cuda when there is one, else cpu
    agent: AgentConfig = option(AgentConfig)

    @classmethod
    def below(cls, values):
        return agent_json(values.get("model"))

    def check_together(self):
        if self.model:
            check_model_name(self.model)
        if self.model in TINY_CONFIGS and not self.tokenizer:
            raise SettingError(f"'model' {self.model!r} is a fresh tiny model with no tokenizer: give --tokenizer")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(device).type
            if kind not in ("cpu", "cuda"):
                raise RuntimeError("expected cpu or cuda[:N]")
            if kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("this torch has no CUDA device")
        except RuntimeError as e:
            raise SettingError(f"'device' {device!r}: {str(e).splitlines()[0]}") from None
        self.device, self.dtype = device, self.dtype or ("bfloat16" if device.startswith("cuda") else "float32")

    def load(self):
        """-> (tokenizer, model)."""
        tok = load_tokenizer(self.tokenizer or self.model)
        model = build_model(self.model, dtype=getattr(torch, self.dtype), device=self.device)
        if tok.vocab_size > model.config.vocab_size:
            raise SettingError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
        return tok, model


@dataclass
class ReadSettings(ModelSettings):
    document: str = ""  # a UTF-8 text file (read line by line, never whole)
    question: str = ""
    temperature: float = option(0.0, TEMPERATURE)  # 0: greedy
    top_p: float = option(1.0, TOP_P)
    seed: int = option(0, within(0, INT64))
    quiet: bool = False  # a progress bar instead of the memory after each chunk

    def check_together(self):
        super().check_together()
        for key in ("model", "document", "question"):
            if not getattr(self, key).strip():
                raise SettingError(f"'{key}' is required")
        if not os.path.isfile(self.document):
            raise SettingError(f"'document': no such file {self.document!r}" if not os.path.exists(self.document)
                               else f"'document': {self.document!r} is not a file")


def main(argv=None):
    try:  # every setting is checked before the model is loaded
        args = ReadSettings.from_argv(sys.argv[1:] if argv is None else argv, __doc__)
        print(f"agent: {asdict(args.agent)}")
        tok, model = args.load()
        agent = MemoryAgent(Engine(model), tok, args.agent, keep_conversations=False)
    except (ValueError, OSError) as e:
        sys.exit(f"memory_agent.py: {e}")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    sample = Sample("document", args.question, Path(args.document), [])
    bar = None
    if args.quiet:
        from tqdm import tqdm
        bar = tqdm(desc="reading", unit="tok")

    def show(traj):
        if bar is not None:
            bar.update(traj.tokens_read - bar.n)
        elif traj.answer_text is None and traj.error is None:
            print(f"--- memory after chunk {len(traj.memories)} ({traj.tokens_read} document tokens read)\n"
                  f"{traj.memories[-1] or '(empty)'}", flush=True)

    traj = agent.run([sample], params=params, on_turn=show)[0]
    if bar is not None:
        bar.close()
    if traj.error:
        sys.exit(f"error: {traj.error}")
    print(f"--- answer ({traj.tokens_read} document tokens in {len(traj.memories)} chunks)\n{traj.answer_text}")
    print(f"boxed: {traj.answer}")


if __name__ == "__main__":
    main()
