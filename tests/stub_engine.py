"""A stand-in for rollout.Engine's request interface, for tests of code that drives an engine (the
agent, the evaluation): each step() answers every queued request at once through reply()."""
from rollout import Completion


class QueueEngine:
    def __init__(self, max_len=100_000):
        self.max_len, self.queue, self.ids = max_len, [], 0
        self.num_blocks, self.block_size = max_len, 1  # a KV cache that holds a whole sequence
        self.stats = dict(prefill_tokens=0, decode_tokens=0)

    def add_request(self, prompt, params):
        self.queue.append((self.ids, prompt, params))
        self.ids += 1
        return self.ids - 1

    def has_unfinished(self):
        return bool(self.queue)

    def abort(self, rid):
        self.queue = [q for q in self.queue if q[0] != rid]

    def step(self):
        done, self.queue = self.queue, []
        return [self.reply(rid, prompt, params) for rid, prompt, params in done]

    def reply(self, rid, prompt, params) -> Completion:
        raise NotImplementedError
