"""The rollout engine: paged KV cache, continuous batching with mixed steps, prefix caching, sampling.

A minimal vLLM in five concepts:
  Sequence      one request: prompt, generated tokens, behaviour log-probs, its KV block table
  BlockManager  fixed-size KV blocks with ref counts; full blocks are hashed (a chain over all
                tokens before them) so an identical prefix is computed once and shared
  Scheduler     builds each step's batch under a token budget: one token for every decoding
                sequence first, then prompt chunks (started prompts before new admissions); preempts
                the newest sequence when blocks run out (it is recomputed later: never a crash,
                never a wrong token)
  ModelRunner   owns the KV cache; turns a scheduled batch into one forward of the model's own
                modules (the live policy, no weight copy) and samples; CUDA graphs for pure decode
  Engine        the front end: validates requests, steps the scheduler and runner, returns Completions
"""
import enum
import functools
import itertools
import math
import numbers
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace

import torch

import paged_attention
from settings import TEMPERATURE, TOP_P, EngineConfig, Settings, option, within

MAX_GRAPH_BATCH = 512  # decode batches up to this size replay a captured CUDA graph
_M31 = 0x7FFFFFFF
_M32 = 0xFFFFFFFF


def derive_seed(*parts) -> int:
    """A 31-bit seed from a tuple of ints (a run seed, a step, a sample index, a turn, ...). CPython
    hashes tuples of ints the same in every process, so ranks and reruns agree."""
    return hash(tuple(int(p) for p in parts)) & _M31


# --------------------------------------------------------------------------------------------
# requests and results

@dataclass(frozen=True)
class SamplingParams(Settings):
    """How one request samples; checked when built, and frozen, so a request that got in stays valid."""
    temperature: float = option(1.0, TEMPERATURE)  # 0 = greedy
    top_p: float = option(1.0, TOP_P)
    top_k: int = option(0, within(0, 2**31 - 1))  # 0 = no top-k
    max_new_tokens: int = option(256, within(1, 2**31 - 1))
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: drawn from the engine's seed sequence


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    request_id: int = -1
    num_prefix_hits: int = 0  # prompt tokens whose KV came from the prefix cache


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(self, request_id, prompt, params, seed):
        self.id = request_id
        self.prompt = list(prompt)
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.params = params
        self.seed = seed
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_hashed = 0  # leading full blocks registered in the prefix cache
        self.last_hash = None  # hash chain value of block num_hashed - 1
        self.num_prefix_hits = 0
        self.status = Status.WAITING
        self.finish_reason = None

    @property
    def tokens(self):
        return self.prompt + self.output

    def token_slice(self, start, end):  # tokens[start:end] without concatenating prompt and output
        P = len(self.prompt)
        if end <= P:  # pragma: no mutate  at end == P both branches give prompt[start:]
            return self.prompt[start:end]
        if start >= P:  # pragma: no mutate  at start == P both branches give output[:end - P]
            return self.output[start - P:end - P]
        return self.prompt[start:] + self.output[:end - P]

    @property
    def is_decoding(self):  # every token but the newest is in the cache: one token to compute
        return self.num_computed == len(self) - 1

    def __len__(self):
        return len(self.prompt) + len(self.output)


# --------------------------------------------------------------------------------------------
# KV blocks

class BlockManager:
    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.hash = [None] * num_blocks  # chain hash of a full, registered block
        self.contents = [None] * num_blocks  # its tokens, to verify a hash hit
        self.by_hash: dict[int, int] = {}
        # Free blocks in the order they were freed (an ordered set): we reuse the oldest first, so
        # a recently released prefix (the previous turn of the same question) stays findable longer.
        self.free = OrderedDict.fromkeys(range(num_blocks))
        self.cache_hits = 0  # prompt tokens served from the cache, since creation

    @property
    def num_free(self):
        return len(self.free)

    def _take(self):
        b, _ = self.free.popitem(last=False)
        if self.hash[b] is not None:  # the block is being reused: forget what it held
            if self.by_hash.get(self.hash[b]) == b:
                del self.by_hash[self.hash[b]]
            self.hash[b] = self.contents[b] = None
        self.ref[b] = 1
        return b

    def _share(self, b):
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def blocks_needed(self, n_tokens):
        return -(-n_tokens // self.block_size)

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached full blocks of its
        prefix. False (and nothing taken) if the free blocks do not suffice."""
        assert not seq.block_table
        tokens, bs = seq.tokens, self.block_size
        hits, h = [], None
        # At least one token must be computed to get logits, so the last token's block is never a hit.
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((h, block_tokens))
            b = self.by_hash.get(h)
            if b is None or self.contents[b] != block_tokens:
                break
            hits.append((b, h))
        need = self.blocks_needed(len(tokens)) - len(hits)
        need_free = need + sum(self.ref[b] == 0 for b, _ in hits)
        if need_free > self.num_free:
            return False
        for b, _ in hits:
            self._share(b)
        seq.block_table = [b for b, _ in hits] + [self._take() for _ in range(need)]
        seq.num_computed = seq.num_prefix_hits = len(hits) * bs
        seq.num_hashed = len(hits)
        seq.last_hash = hits[-1][1] if hits else None
        self.cache_hits += len(hits) * bs
        return True

    def append_slot(self, seq: Sequence) -> bool:
        """Make room for the K/V of the sequence's last token (the one decode computes now); False
        if that needs a new block and none is free."""
        if len(seq) <= len(seq.block_table) * self.block_size:
            return True
        if not self.free:
            return False
        seq.block_table.append(self._take())
        return True

    def register_full_blocks(self, seq: Sequence, num_tokens: int):
        """Enter the sequence's full blocks among its first num_tokens tokens into the prefix cache.
        Called when those tokens are scheduled: a sequence admitted later in the same step may then
        share them, because every layer stores the whole batch's K/V before any attention reads."""
        bs, tokens = self.block_size, None
        while (seq.num_hashed + 1) * bs <= num_tokens:
            tokens = tokens or seq.tokens
            i = seq.num_hashed
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            h = hash((seq.last_hash, block_tokens))
            b = seq.block_table[i]
            if self.hash[b] is None and h not in self.by_hash:
                self.hash[b], self.contents[b] = h, block_tokens
                self.by_hash[h] = b
            seq.last_hash, seq.num_hashed = h, i + 1

    def forget_prefixes(self):
        """Unregister every cached block: after a step that failed mid-forward, blocks registered
        when scheduled may hold K/V that was never written."""
        self.by_hash.clear()
        self.hash = [None] * len(self.hash)
        self.contents = [None] * len(self.contents)

    def release(self, seq: Sequence):
        """Drop the sequence's references; unreferenced blocks keep their contents until reused."""
        for b in reversed(seq.block_table):  # the tail goes first in line for reuse
            self.ref[b] -= 1
            assert self.ref[b] >= 0
            if self.ref[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_computed = seq.num_hashed = 0
        seq.last_hash = None


# --------------------------------------------------------------------------------------------
# scheduling

@dataclass
class Batch:
    """One step's work: seqs[i] computes num_tokens[i] tokens; the first num_decode seqs decode
    (one token each), the rest prefill a chunk of their prompt (or of their recompute)."""
    seqs: list
    num_tokens: list
    num_decode: int = 0

    def add(self, seq, n):
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs, max_num_batched_tokens):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0

    def add(self, seq):
        self.waiting.append(seq)

    def schedule(self):
        """-> (this step's Batch, sequences finished because they alone outgrew the whole cache).
        Decode tokens go first (each costs one token of the budget), then prompt chunks fill the
        rest, so one forward serves both and no sequence waits a step for the other kind."""
        batch, out_of_room, budget = Batch([], []), [], self.max_tokens
        for s in list(self.running):
            if budget and s.status is Status.RUNNING and s.is_decoding and self._make_room(s, out_of_room):
                batch.add(s, 1)
                budget -= 1
        batch.num_decode = len(batch.seqs)
        for s in self.running:  # prompts already started finish before new ones are admitted
            if budget and not s.is_decoding:
                budget -= self._add_chunk(s, budget, batch)
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            if not self.blocks.allocate(s):
                break
            self.waiting.popleft()
            s.status = Status.RUNNING
            self.running.append(s)
            budget -= self._add_chunk(s, budget, batch)
        return batch, out_of_room

    def _add_chunk(self, s, budget, batch):
        n = min(len(s) - s.num_computed, budget)
        batch.add(s, n)
        self.blocks.register_full_blocks(s, s.num_computed + n)
        return n

    def _make_room(self, s, out_of_room):
        """A block for s's next token, preempting the newest sequences until one is free.
        False if s itself was preempted, or finished because it alone outgrew the cache."""
        while not self.blocks.append_slot(s):
            victim = self.running[-1]
            if victim is s and len(self.running) == 1:
                self.finish(s, "length")
                out_of_room.append(s)
                return False
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _preempt(self, seq):
        """Free the newest sequence's blocks; it keeps its tokens and is recomputed when readmitted."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq, reason):
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.running.remove(seq)
        self.blocks.release(seq)

    def abort(self, seq):
        if seq.status is Status.RUNNING:
            self.finish(seq, "abort")
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED


# --------------------------------------------------------------------------------------------
# the paged-attention backend the model's Attention layers call (model.py's attention interface)

class PagedKV:
    """One step's attention metadata, built once and shared by every layer, plus the caches.
    Tokens are packed (B == 1): the first num_decode are one query each of the first num_decode
    sequences (split-KV decode attention); the rest are prompt chunks (paged prefill attention)."""

    def __init__(self, k_cache, v_cache, slot_mapping, context_lens, block_tables, num_decode,
                 cu_seqlens_q, max_seqlen_q, backend=None):
        self.k_cache, self.v_cache = k_cache, v_cache  # (L, num_blocks, block_size, Hkv, D)
        self.slot_mapping, self.context_lens, self.block_tables = slot_mapping, context_lens, block_tables
        self.num_decode = num_decode
        self.cu_seqlens_q, self.max_seqlen_q = cu_seqlens_q, max_seqlen_q  # of the prefill part
        self.backend = backend
        self.plans = {}  # per-step work the reference kernels would otherwise redo in every layer

    def attend(self, layer, q, k, v):  # q (1, N, Hq, D), k/v (1, N, Hkv, D)
        q, k, v = q[0], k[0], v[0]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        paged_attention.store_kv(k, v, kc, vc, self.slot_mapping, backend=self.backend)
        scale, nd = q.shape[-1] ** -0.5, self.num_decode
        if nd == q.shape[0]:
            return paged_attention.decode_attention(q, kc, vc, self.context_lens, self.block_tables, scale,
                                            backend=self.backend, plans=self.plans)[None]
        out = paged_attention.prefill_attention(q[nd:], kc, vc, self.cu_seqlens_q, self.context_lens[nd:],
                                        self.block_tables[nd:], self.max_seqlen_q, scale,
                                        backend=self.backend, plans=self.plans)
        if nd:
            dec = paged_attention.decode_attention(q[:nd], kc, vc, self.context_lens[:nd], self.block_tables[:nd],
                                           scale, backend=self.backend, plans=self.plans)
            out = torch.cat([dec, out])
        return out[None]  # (1, N, Hq, D)


# --------------------------------------------------------------------------------------------
# sampling

def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32. It
    works in place on one fresh tensor: at (B, V) the allocations cost more than the arithmetic."""
    x = x & _M32
    x ^= x >> 16
    x *= 0x45D9F3B
    x &= _M32
    x ^= x >> 16
    x *= 0x45D9F3B
    x &= _M32
    x ^= x >> 16
    return x


def sample(logits, temperature, top_p, top_k, seeds, positions):
    """Sample one token per row; -> (tokens, log-probs under the sampling distribution).

    logits (B, V); per-row lists (B Python numbers each) of temperature/top_p/top_k/seed/position.
    Randomness is counter-based: the Gumbel noise of row b is a hash of (seed_b, position_b, vocab
    index), so a request's tokens depend only on its own seed, never on what else is in the batch or
    on preemption. Rows with temperature 0 take the argmax and report log_softmax(logits). What a
    batch needs is decided from the lists on the host: a step runs only the ops its rows use."""
    B, V = logits.shape
    dev = logits.device
    scaled = logits.float()
    if any(t not in (0, 1) for t in temperature):  # greedy rows and temperature 1 divide by 1: exact
        scaled = scaled / torch.tensor([t or 1.0 for t in temperature], dtype=torch.float32, device=dev)[:, None]
    nucleus = any(p < 1 for p in top_p)  # pragma: no mutate  at top_p 1 the sorted path drops nothing
    if any(k > 0 for k in top_k) or nucleus:
        top_k = torch.tensor(top_k, device=dev)[:, None]
        top_p = torch.tensor(top_p, dtype=torch.float32, device=dev)[:, None]
        sorted_logits, order = scaled.sort(-1, descending=True)  # (B, V)
        drop = (top_k > 0) & (torch.arange(V, device=dev)[None] >= top_k)
        probs = sorted_logits.masked_fill(drop, -math.inf).softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop |= ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1)
        scaled = torch.full_like(scaled, -math.inf).scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    logp = scaled.log_softmax(-1)  # (B, V)
    rows = [b for b, t in enumerate(temperature) if t != 0]
    tokens = logp.argmax(-1) if len(rows) < B else None  # pragma: no mutate  sampled rows overwrite it
    if rows:  # Gumbel-max: argmax(logp + g) is a sample from softmax(logp)
        seed = torch.tensor([seeds[b] & _M32 for b in rows], device=dev)
        pos = torch.tensor([positions[b] for b in rows], device=dev)
        counter = _mix32(_mix32(seed) ^ pos)[:, None] ^ torch.arange(V, device=dev)
        # 23 random bits: (k + 0.5) / 2^23 is exact in fp32, so u stays strictly inside (0, 1)
        u = ((_mix32(_mix32(counter)) >> 9).float() + 0.5) / 2.0**23
        noisy = (logp if tokens is None else logp[rows]) - torch.log(-torch.log(u))
        if tokens is None:
            tokens = noisy.argmax(-1)
        else:
            tokens[rows] = noisy.argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------
# the model runner

def graph_batch_size(batch_size):
    """The captured CUDA-graph size that serves a decode batch: the next power of two, or None
    when the batch is larger than any graph we capture."""
    size = 1 << (batch_size - 1).bit_length()
    return size if size <= MAX_GRAPH_BATCH else None


def fill_graph_inputs(io, ids, pos, slots, ctx, tables):
    """Copy a decode batch of B rows into a captured graph's static inputs of `size` >= B rows. Padded
    rows write no K/V (slot -1) and attend to one key of block 0, so they cost little and touch
    nothing another row reads."""
    B, width = ctx.shape[0], tables.shape[1]
    io["ids"].zero_()
    io["pos"].zero_()
    io["slots"].fill_(-1)
    io["ctx"].fill_(1)
    io["tables"].zero_()
    io["ids"][0, :B] = ids[0]
    io["pos"][0, :B] = pos[0]
    io["slots"][:B] = slots
    io["ctx"][:B] = ctx
    io["tables"][:B, :width] = tables


class ModelRunner:
    """The KV cache and one forward per scheduled batch, with CUDA graphs for pure decode steps."""

    def __init__(self, model, num_blocks, block_size, backend=None, cuda_graphs=True):
        cfg, p = model.config, next(model.parameters())
        self.model, self.backend = model, backend
        self.device, self.block_size = p.device, block_size
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeros: attention reads whole pages and masks the slots past a sequence's end, and a
        # masked zero contributes nothing (masked NaN garbage would: NaN * 0 is NaN).
        self.k_cache = torch.zeros(shape, dtype=p.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=p.dtype, device=self.device)
        self.max_table_width = -(-(cfg.max_position_embeddings + 1) // block_size)
        # graphs need kernels that never read tensor values on the host: the Triton ones
        resolved = backend or os.environ.get("MEMAGENT_KERNELS") or "triton"
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and resolved == "triton"
        self.graphs = {}

    def run(self, batch: Batch):
        """Forward the batch's tokens; sample for every sequence whose input ends in this step.
        -> [(sequence, token, log-prob, whether its logits were finite)]."""
        ids, pos, kv, rows = self._prepare(batch)
        with torch.inference_mode():
            if self.use_graphs and batch.num_decode == len(batch.seqs) and graph_batch_size(len(rows)):
                logits = self._decode_graph(ids, pos, kv.slot_mapping, kv.context_lens, kv.block_tables)
            else:
                logits = self.model(ids, pos, attn=kv, logits_rows=rows)[0]  # (len(rows), V)
            sampled = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed + n == len(s)]
            if not sampled:
                return []
            P = [s.params for s in sampled]
            tok, lp = sample(logits, [p.temperature for p in P], [p.top_p for p in P], [p.top_k for p in P],
                             [s.seed for s in sampled], [len(s) for s in sampled])
            finite = torch.isfinite(logits.float()).all(-1)  # (len(rows),)
        return list(zip(sampled, tok.tolist(), lp.tolist(), finite.tolist()))

    def _prepare(self, batch):
        """Token ids, positions, the step's PagedKV metadata (built once, for all layers) and the rows
        to take logits at. Built as Python lists and moved in three tensors: on CPU each tensor
        costs more than the lists of a whole decode batch."""
        dev, bs = self.device, self.block_size
        ids, pos, slots, rows, ctx, cu = [], [], [], [], [], [0]
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start, end = s.num_computed, s.num_computed + n
            ids += s.token_slice(start, end)
            pos += range(start, end)
            p = start
            while p < end:  # the slots within one block are one range
                block, offset = divmod(p, bs)
                m = min(end - p, bs - offset)
                first = s.block_table[block] * bs + offset
                slots += range(first, first + m)
                p += m
            if i >= batch.num_decode:
                cu.append(cu[-1] + n)
            ctx.append(end)
            if end == len(s):
                rows.append(len(ids) - 1)
        N, B = len(ids), len(ctx)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs],
                              dtype=torch.int32, device=dev)  # (B, width)
        longs = torch.tensor(ids + pos + slots, dtype=torch.long, device=dev)  # (3N,)
        ints = torch.tensor(ctx + cu, dtype=torch.int32, device=dev)  # (B + prefill seqs + 1,)
        kv = PagedKV(self.k_cache, self.v_cache, longs[2 * N:], ints[:B], tables, batch.num_decode, ints[B:],
                     max(batch.num_tokens[batch.num_decode:], default=0), self.backend)
        return longs[:N].view(1, N), longs[N:2 * N].view(1, N), kv, rows

    def _decode_graph(self, ids, pos, slots, ctx, tables):
        """Replay the captured decode step of the smallest captured batch size >= B."""
        size = graph_batch_size(ctx.shape[0])
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        g, io = self.graphs[size]
        fill_graph_inputs(io, ids, pos, slots, ctx, tables)
        g.replay()
        return io["logits"][:ctx.shape[0]]

    def _capture(self, size):
        dev, width = self.device, self.max_table_width
        io = dict(ids=torch.zeros(1, size, dtype=torch.long, device=dev),
                  pos=torch.zeros(1, size, dtype=torch.long, device=dev),
                  slots=torch.full((size,), -1, dtype=torch.long, device=dev),
                  ctx=torch.ones(size, dtype=torch.int32, device=dev),
                  tables=torch.zeros(size, width, dtype=torch.int32, device=dev))
        kv = lambda: PagedKV(self.k_cache, self.v_cache, io["slots"], io["ctx"], io["tables"], size, None, 0,
                             self.backend)
        self.model(io["ids"], io["pos"], attn=kv())  # warm-up: compile the kernels outside the capture
        torch.cuda.synchronize(dev)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            io["logits"] = self.model(io["ids"], io["pos"], attn=kv())[0]
        return g, io


def gpu_kv_budget(free, total, reserved, allocated, gpu_memory_utilization):
    """Bytes the KV cache may take on a GPU with `free` of `total` bytes free: all that is free, plus
    what PyTorch's allocator holds (reserved) but no tensor uses (allocated), less the share of the
    total that gpu_memory_utilization leaves to others."""
    return free + (reserved - allocated) - (1 - gpu_memory_utilization) * total


# --------------------------------------------------------------------------------------------
# the engine

def one_thread(method):
    """An engine's state is one thread's: a second thread is refused while the first is inside a call
    or has requests in flight (their completions would go to whoever steps next)."""
    @functools.wraps(method)
    def guarded(self, *args, **kw):
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("Engine: in use by another thread; use one engine per thread")
        try:
            me = threading.get_ident()
            if self.owner not in (None, me) and self.has_unfinished():
                raise RuntimeError("Engine: another thread has requests in flight; use one engine per thread")
            self.owner = me
            return method(self, *args, **kw)
        finally:
            self.busy.release()
    return guarded


class Engine:
    def __init__(self, model, num_blocks=None, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
                 gpu_memory_utilization=0.9, kv_cache_bytes=2**30, cuda_graphs=True, backend=None,
                 progress=False, seed=0):
        """num_blocks: KV blocks per layer; if None, from free GPU memory x gpu_memory_utilization on
        CUDA, else from kv_cache_bytes. max_num_batched_tokens: tokens (decode + prefill) per step.
        One thread at a time: a call from a second thread while the first has requests in flight is
        refused (RuntimeError), never interleaved."""
        EngineConfig(block_size=block_size, num_blocks=num_blocks or 0, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=gpu_memory_utilization)
        cfg, p = model.config, next(model.parameters())
        self.max_len, self.vocab_size = cfg.max_position_embeddings, cfg.vocab_size
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(cfg, p, block_size, gpu_memory_utilization, kv_cache_bytes)
        if num_blocks < 2:
            raise ValueError(f"Engine: KV cache too small: {num_blocks} blocks of {block_size} tokens "
                             f"(raise num_blocks, kv_cache_bytes or gpu_memory_utilization)")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, backend, cuda_graphs)
        self.progress = progress
        self.seeds = itertools.count(seed * 1_000_003 + 1)
        self.ids = itertools.count()
        self.requests: dict[int, Sequence] = {}  # live requests by id
        self.rejected: list[Completion] = []  # bad requests, returned by the next step
        self.stats = dict(prefill_tokens=0, decode_tokens=0, steps=0, forward_s=0.0)
        self.busy, self.owner = threading.RLock(), None
        self.weights_version = None

    @staticmethod
    def _blocks_from_memory(cfg, p, block_size, gpu_memory_utilization, kv_cache_bytes):
        bytes_per_block = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * p.element_size()
        if p.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(p.device)
            budget = gpu_kv_budget(free, total, torch.cuda.memory_reserved(p.device),
                                   torch.cuda.memory_allocated(p.device), gpu_memory_utilization)
        else:
            budget = kv_cache_bytes
        return int(budget // bytes_per_block)

    # -- requests ----------------------------------------------------------------------------------

    @one_thread
    def add_request(self, prompt, params: SamplingParams) -> int:
        """Queue a prompt; returns its request id. A bad request finishes at once with an error."""
        rid = next(self.ids)
        try:
            prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # a tensor, a numpy array
            self._check_request(prompt, params)
        except (ValueError, TypeError) as e:
            self.rejected.append(Completion([], [], "error", f"request {rid}: {e}", rid))
            return rid
        seed = params.seed if params.seed is not None else next(self.seeds)
        seq = Sequence(rid, prompt, params, seed)
        self.requests[rid] = seq
        self.scheduler.add(seq)
        return rid

    def _check_request(self, prompt, params):
        if not isinstance(params, SamplingParams):  # built, so checked
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids {list(params.stop_token_ids)} hold an id outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"a prompt is a non-empty list of token ids, got {str(prompt)[:50]}")
        if all(type(t) is int for t in prompt):  # the usual case, checked without a Python test per token
            lo, hi = min(prompt), max(prompt)
            bad = lo if lo < 0 else hi if hi >= self.vocab_size else None
        else:
            bad = next((t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)
                        or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt holds token id {bad!r}, outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's {self.max_len} positions")
        if self.blocks.blocks_needed(len(prompt) + 1) > self.num_blocks:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the KV cache "
                             f"({self.num_blocks} blocks of {self.block_size})")

    @one_thread
    def abort(self, request_id):
        """Drop a queued or running request and free its blocks; no Completion is returned for it."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.abort(seq)
        self.rejected = [c for c in self.rejected if c.request_id != request_id]

    def has_unfinished(self):
        return bool(self.requests or self.rejected)

    # -- stepping ----------------------------------------------------------------------------------

    @one_thread
    def step(self) -> list[Completion]:
        """Run one mixed decode + prefill step; returns the requests that finished in it (and any
        rejected since the last step)."""
        version = sum(p._version for p in self.runner.model.parameters())  # bumped by in-place updates
        if version != self.weights_version:  # cached prefixes were computed by other weights
            self.blocks.forget_prefixes()
            self.weights_version = version
        batch, out_of_room = self.scheduler.schedule()
        done, self.rejected = self.rejected, []
        done += [self._complete(s) for s in out_of_room]
        if batch.seqs:
            t0 = time.perf_counter()
            try:
                sampled = self.runner.run(batch)
            except BaseException:  # an OOM, a ^C: what this step registered was never computed
                self.blocks.forget_prefixes()
                raise
            done += self._postprocess(batch, sampled)
            self.stats["decode_tokens"] += batch.num_decode
            self.stats["prefill_tokens"] += sum(batch.num_tokens) - batch.num_decode
            self.stats["steps"] += 1
            self.stats["forward_s"] += time.perf_counter() - t0
        return done

    def _postprocess(self, batch, sampled):
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed += n
            self.blocks.register_full_blocks(s, s.num_computed)
        done = []
        for s, tok, lp, finite in sampled:
            s.output.append(tok)
            s.logprobs.append(lp)
            if not finite:  # NaN or inf in the model's output: no token of it is a sample
                self.scheduler.finish(s, "error")
                done.append(replace(self._complete(s), error=f"request {s.id}: the model's logits are not finite"))
                continue
            if tok in s.params.stop_token_ids:
                reason = "stop"
            elif len(s.output) >= s.params.max_new_tokens or len(s) >= self.max_len:
                reason = "length"
            else:
                continue
            self.scheduler.finish(s, reason)
            done.append(self._complete(s))
        return done

    def _complete(self, s):
        del self.requests[s.id]
        return Completion(s.output, s.logprobs, s.finish_reason, None, s.id, s.num_prefix_hits)

    @one_thread
    def generate(self, prompts, params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Generate a completion for every prompt (same order). params: one for all, or one each."""
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        if self.has_unfinished():  # their completions would come back to this call
            raise RuntimeError("generate: the engine holds requests added outside this call; step them out first")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results, bar = {}, None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="seq")
        try:
            while len(results) < len(ids):
                assert self.has_unfinished(), "engine idle with requests outstanding"
                for c in self.step():
                    results[c.request_id] = c
                    if bar:
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{self.tokens_per_s():.0f}")
        finally:  # an exception (a model error, ^C) leaves no request of this call behind
            for i in ids:
                self.abort(i)
            if bar:
                bar.close()
        return [results[i] for i in ids]

    def tokens_per_s(self):
        s = self.stats
        return (s["prefill_tokens"] + s["decode_tokens"]) / max(s["forward_s"], 1e-9)
