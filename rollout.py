"""The rollout engine: paged KV cache, continuous batching, prefix caching, sampling.

A minimal vLLM in four concepts:
  Sequence      one request: prompt, generated tokens, behaviour log-probs, its KV block table
  BlockManager  fixed-size KV blocks with ref counts; full blocks are hashed (a chain over all
                tokens before them) so an identical prefix is computed once and shared
  Scheduler     admits waiting sequences when blocks and the token budget allow, prefills long
                prompts in chunks, alternates prefill and decode steps, preempts the newest
                sequence when blocks run out (it is recomputed later: never a crash, never a
                wrong token)
  Engine        runs the model's own modules and weights in place (RL samples from the live
                policy), samples with counter-based per-request randomness, and exposes both
                `generate(prompts, params)` and an incremental add/step interface.
"""
import itertools
import math
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

import kernels


# --------------------------------------------------------------------------------------------
# requests and results

@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    max_new_tokens: int = 256
    stop_token_ids: tuple = ()
    seed: int | None = None  # None: drawn from the engine's seed sequence

    def check(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    request_id: int = -1
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


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
        self.num_cached_tokens = 0
        self.status = WAITING
        self.finish_reason = None

    @property
    def tokens(self):
        return self.prompt + self.output

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
        seq.num_computed = len(hits) * bs
        seq.num_hashed = len(hits)
        seq.last_hash = hits[-1][1] if hits else None
        seq.num_cached_tokens = len(hits) * bs
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

class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs, max_num_batched_tokens):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.last_was_prefill = False
        self.num_preemptions = 0
        self.finished: list[Sequence] = []  # finished by the scheduler itself (cache exhausted)

    def add(self, seq):
        self.waiting.append(seq)

    def has_work(self):
        return bool(self.waiting or self.running)

    def schedule(self):
        """-> (sequences, tokens to compute for each, is_prefill)."""
        decoding = [s for s in self.running if s.num_computed == len(s) - 1]
        prefilling = [s for s in self.running if s.num_computed < len(s) - 1]
        want_prefill = prefilling or (self.waiting and len(self.running) < self.max_num_seqs)
        # Alternate: a prefill step, then a decode step for everyone already generating.
        if want_prefill and not (self.last_was_prefill and decoding):
            batch = self._schedule_prefill(prefilling)
            if batch[0]:
                self.last_was_prefill = True
                return batch
        self.last_was_prefill = False
        return self._schedule_decode(decoding)

    def _schedule_prefill(self, prefilling):
        seqs, counts, budget = [], [], self.max_tokens
        for s in prefilling:  # finish prompts already started before admitting new ones
            if budget == 0:
                break
            budget -= self._add_chunk(s, budget, seqs, counts)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            if not self.blocks.allocate(s):
                break
            self.waiting.popleft()
            s.status = RUNNING
            self.running.append(s)
            budget -= self._add_chunk(s, budget, seqs, counts)
        return seqs, counts, True

    def _add_chunk(self, s, budget, seqs, counts):
        n = min(len(s) - s.num_computed, budget)
        seqs.append(s)
        counts.append(n)
        self.blocks.register_full_blocks(s, s.num_computed + n)
        return n

    def _schedule_decode(self, decoding):
        batch = []
        for s in decoding:
            if s.status != RUNNING:
                continue  # preempted below to make room for an older sequence
            while not self.blocks.append_slot(s):
                victim = self.running[-1]
                if victim is s and len(self.running) == 1:
                    self.finish(s, "length")  # alone, it has outgrown the whole cache
                    self.finished.append(s)
                    break
                self._preempt(victim)
                if victim is s:
                    break
            else:
                batch.append(s)
        return batch, [1] * len(batch), False

    def _preempt(self, seq):
        """Free the newest sequence's blocks; it keeps its tokens and is recomputed when readmitted."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq, reason):
        seq.status, seq.finish_reason = FINISHED, reason
        self.running.remove(seq)
        self.blocks.release(seq)


# --------------------------------------------------------------------------------------------
# the paged-attention context the model's Attention layers call into

class PagedKV:
    """Batch metadata + the per-layer caches; `Attention` calls `attend` in place of SDPA."""

    def __init__(self, k_cache, v_cache, slot_mapping, context_lens, block_tables, cu_seqlens_q=None,
                 max_seqlen_q=1, backend=None):
        self.k_cache, self.v_cache = k_cache, v_cache  # (L, num_blocks, block_size, Hkv, D)
        self.slot_mapping, self.context_lens, self.block_tables = slot_mapping, context_lens, block_tables
        self.cu_seqlens_q, self.max_seqlen_q = cu_seqlens_q, max_seqlen_q
        self.backend = backend

    def attend(self, layer, q, k, v):  # q (N, Hq, D), k/v (N, Hkv, D)
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kernels.store_kv(k, v, kc, vc, self.slot_mapping, backend=self.backend)
        scale = q.shape[-1] ** -0.5
        if self.cu_seqlens_q is None:  # decode: one query per sequence
            return kernels.decode_attention(q, kc, vc, self.context_lens, self.block_tables, scale,
                                            backend=self.backend)
        return kernels.prefill_attention(q, kc, vc, self.cu_seqlens_q, self.context_lens, self.block_tables,
                                         self.max_seqlen_q, scale, backend=self.backend)


# --------------------------------------------------------------------------------------------
# sampling

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def sample(logits, temperature, top_p, top_k, seeds, positions):
    """Sample one token per row; -> (tokens, log-probs under the sampling distribution).

    logits (B, V); per-row temperature/top_p/top_k/seed/position tensors (B,). Randomness is
    counter-based: the Gumbel noise of row b is a hash of (seed_b, position_b, vocab index), so a
    request's tokens depend only on its own seed, never on what else is in the batch or on
    preemption. Rows with temperature 0 take the argmax and report log_softmax(logits)."""
    B, V = logits.shape
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # (B, V)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(-1, descending=True)  # (B, V)
        rank = torch.arange(V, device=logits.device)
        drop = (top_k[:, None] > 0) & (rank[None] >= top_k[:, None])
        probs = sorted_logits.masked_fill(drop, -math.inf).softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        scaled = torch.full_like(scaled, -math.inf).scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    logp = scaled.log_softmax(-1)  # (B, V)
    tokens = logp.argmax(-1)
    if not bool(greedy.all()):  # Gumbel-max: argmax(logp + g) is a sample from softmax(logp)
        rows = (~greedy).nonzero().squeeze(-1)
        counter = _mix32(_mix32(seeds[rows]) ^ positions[rows])[:, None] ^ torch.arange(V, device=logits.device)
        # 23 random bits: (k + 0.5) / 2^23 is exact in fp32, so u stays strictly inside (0, 1)
        u = ((_mix32(_mix32(counter)) >> 9).float() + 0.5) / 2.0**23
        tokens[rows] = (logp[rows] - torch.log(-torch.log(u))).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------
# the engine

class Engine:
    def __init__(self, model, num_blocks=None, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
                 gpu_memory_utilization=0.9, kv_cache_bytes=2**30, cuda_graphs=True, backend=None,
                 progress=False, seed=0):
        """num_blocks: KV blocks per layer; if None, from free GPU memory x gpu_memory_utilization on
        CUDA, else from kv_cache_bytes. max_num_batched_tokens: prefill tokens per step."""
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.model = model
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = cfg.max_position_embeddings
        shape = (cfg.num_layers, 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        bytes_per_block = 2 * math.prod(shape) * p.element_size()
        if num_blocks is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                # memory PyTorch holds in its cache but no tensor uses is free for us too
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                budget = free - (1 - gpu_memory_utilization) * total
            else:
                budget = kv_cache_bytes
            num_blocks = int(budget // bytes_per_block)
        if num_blocks < 2:
            raise ValueError(f"KV cache too small: {num_blocks} blocks of {block_size} tokens")
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Uninitialised: the kernels never read a slot no sequence has written.
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.backend = backend
        self.progress = progress
        self.seeds = itertools.count(seed * 1_000_003 + 1)
        self.ids = itertools.count()
        self.finished: list[Completion] = []
        self.stats = dict(prefill_tokens=0, decode_tokens=0, prefill_s=0.0, decode_s=0.0)
        self.graphs = {}
        self.use_graphs = cuda_graphs and self.device.type == "cuda"

    # -- incremental interface ----------------------------------------------------------------

    def add_request(self, prompt, params: SamplingParams) -> int:
        """Queue a prompt; returns its request id. A bad request finishes at once with an error."""
        rid = next(self.ids)
        seed = params.seed if params.seed is not None else next(self.seeds)
        seq = Sequence(rid, prompt, params, seed)
        try:
            params.check()
            if not seq.prompt:
                raise ValueError("empty prompt")
            if len(seq.prompt) >= self.max_len:
                raise ValueError(f"prompt of {len(seq.prompt)} tokens does not fit the model's "
                                 f"{self.max_len} positions")
            if self.blocks.blocks_needed(len(seq.prompt) + 1) > self.num_blocks:
                raise ValueError(f"prompt of {len(seq.prompt)} tokens exceeds the KV cache "
                                 f"({self.num_blocks} blocks of {self.block_size})")
        except ValueError as e:
            self.finished.append(Completion([], [], "error", f"request {rid}: {e}", rid))
            return rid
        self.scheduler.add(seq)
        return rid

    def has_unfinished(self):
        return self.scheduler.has_work()

    def step(self) -> list[Completion]:
        """Run one prefill or decode step; returns the requests that finished (incl. rejected ones)."""
        seqs, counts, is_prefill = self.scheduler.schedule()
        self.finished += [self._completion(s) for s in self.scheduler.finished]
        self.scheduler.finished.clear()
        if seqs:
            t0 = time.perf_counter()
            sampled = self._run(seqs, counts, is_prefill)
            self._postprocess(seqs, counts, sampled)
            kind = "prefill" if is_prefill else "decode"
            self.stats[kind + "_tokens"] += sum(counts)
            self.stats[kind + "_s"] += time.perf_counter() - t0
        done, self.finished = self.finished, []
        return done

    def generate(self, prompts, params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Generate a completion for every prompt (same order)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results = {}
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="seq")
        while len(results) < len(ids):
            if not self.has_unfinished() and not self.finished:
                raise RuntimeError("engine idle with requests outstanding")  # an invariant, not input
            for c in self.step():
                results[c.request_id] = c
                if bar:
                    bar.update(1)
            if bar:
                s = self.stats
                bar.set_postfix(prefill_tok_s=f"{s['prefill_tokens'] / max(s['prefill_s'], 1e-9):.0f}",
                                decode_tok_s=f"{s['decode_tokens'] / max(s['decode_s'], 1e-9):.0f}")
        if bar:
            bar.close()
        return [results[i] for i in ids]

    # -- model execution -----------------------------------------------------------------------

    def _run(self, seqs, counts, is_prefill):
        """Forward the scheduled tokens and sample where a sequence reaches its end of input."""
        dev, bs = self.device, self.block_size
        ids, pos, slots, last_rows, cu = [], [], [], [], [0]
        for s, n in zip(seqs, counts):
            start = s.num_computed
            toks = s.tokens[start:start + n] if is_prefill else [s.output[-1] if s.output else s.prompt[-1]]
            ids += toks
            pos += range(start, start + n)
            slots += [s.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            cu.append(cu[-1] + n)
            if start + n == len(s):
                last_rows.append(cu[-1] - 1)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                              dtype=torch.int32, device=dev)  # (B, width)
        ctx = torch.tensor([s.num_computed + n for s, n in zip(seqs, counts)], dtype=torch.int32, device=dev)
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]  # (1, N)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)[None]
        slots_t = torch.tensor(slots, dtype=torch.long, device=dev)
        with torch.inference_mode():
            if is_prefill:
                kv = PagedKV(self.k_cache, self.v_cache, slots_t, ctx, tables,
                             torch.tensor(cu, dtype=torch.int32, device=dev), max(counts), self.backend)
                h = self.model.hidden(ids_t, pos_t, kv)[0, last_rows]  # (n_sampled, C)
                logits = self.model.lm_head(h)
            elif self.use_graphs:
                logits = self._decode_graph(ids_t, pos_t, slots_t, ctx, tables)
            else:
                kv = PagedKV(self.k_cache, self.v_cache, slots_t, ctx, tables, backend=self.backend)
                logits = self.model(ids_t, pos_t, kv)[0]  # (B, V)
            sampled_seqs = [s for s, n in zip(seqs, counts) if s.num_computed + n == len(s)]
            if not sampled_seqs:
                return []
            P = [s.params for s in sampled_seqs]
            tok, lp = sample(
                logits,
                torch.tensor([p.temperature for p in P], device=dev),
                torch.tensor([p.top_p for p in P], device=dev),
                torch.tensor([p.top_k for p in P], device=dev),
                torch.tensor([s.seed & _M32 for s in sampled_seqs], device=dev),
                torch.tensor([len(s) for s in sampled_seqs], device=dev),
            )
        return list(zip(sampled_seqs, tok.tolist(), lp.tolist()))

    def _postprocess(self, seqs, counts, sampled):
        for s, n in zip(seqs, counts):
            s.num_computed += n
            self.blocks.register_full_blocks(s, s.num_computed)
        for s, tok, lp in sampled:
            s.output.append(tok)
            s.logprobs.append(lp)
            p = s.params
            if tok in p.stop_token_ids:
                reason = "stop"
            elif len(s.output) >= p.max_new_tokens or len(s) >= self.max_len:
                reason = "length"
            else:
                continue
            self.scheduler.finish(s, reason)
            self.finished.append(self._completion(s))

    def _completion(self, s):
        return Completion(s.output, s.logprobs, s.finish_reason, None, s.id, s.num_cached_tokens)

    # -- CUDA graphs for decode ----------------------------------------------------------------

    def _decode_graph(self, ids, pos, slots, ctx, tables):
        """Replay a captured decode step for the smallest captured batch size >= B."""
        B, width = ctx.shape[0], tables.shape[1]
        size = 1 << (B - 1).bit_length()
        max_width = self.blocks.blocks_needed(self.max_len + 1)
        if size > 512 or width > max_width:
            kv = PagedKV(self.k_cache, self.v_cache, slots, ctx, tables, backend=self.backend)
            return self.model(ids, pos, kv)[0]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size, max_width)
        g, io = self.graphs[size]
        io["ids"].zero_()
        io["pos"].zero_()
        io["slots"].fill_(-1)  # padded rows write nothing
        io["ctx"].fill_(1)
        io["tables"].zero_()
        io["ids"][0, :B] = ids[0]
        io["pos"][0, :B] = pos[0]
        io["slots"][:B] = slots
        io["ctx"][:B] = ctx
        io["tables"][:B, :width] = tables
        g.replay()
        return io["logits"][:B]

    def _capture(self, size, width):
        dev = self.device
        io = dict(ids=torch.zeros(1, size, dtype=torch.long, device=dev),
                  pos=torch.zeros(1, size, dtype=torch.long, device=dev),
                  slots=torch.full((size,), -1, dtype=torch.long, device=dev),
                  ctx=torch.ones(size, dtype=torch.int32, device=dev),
                  tables=torch.zeros(size, width, dtype=torch.int32, device=dev))
        kv = PagedKV(self.k_cache, self.v_cache, io["slots"], io["ctx"], io["tables"], backend=self.backend)
        self.model(io["ids"], io["pos"], kv)  # warm-up: compile the kernels outside the capture
        torch.cuda.synchronize(dev)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            io["logits"] = self.model(io["ids"], io["pos"], kv)[0]
        return g, io
