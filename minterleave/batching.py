"""Many requests at once: continuous batching over one left-padded KV cache (serve.py's engine).

    batcher = Batcher(model, eos_token_ids=proc.eos_token_ids, decode=proc.decode)
    job = batcher.submit(Job(ids, pixel_values, max_new=64))
    for event in job.stream(): ...      # ("text", piece) ..., then ("done", finish_reason, n_tokens)

One worker thread owns the model. Each iteration it admits what is waiting (up to max_batch rows in
all): the new prompts are prefilled together as one left-padded batch, their first tokens sampled, and
their cache rows merged into the running batch right-aligned, so that every row's newest token sits in
the last column; then one decode step runs for all rows. A finished row leaves at once, and the columns
that no remaining row attends to are trimmed off the left. Positions come from the padding mask
(Model.positions_and_mask), so each row gets the tokens it would get alone (greedy), and a seeded row
samples with its own generator, as it would alone.
References: Orca (Yu et al., OSDI 2022) for iteration-level scheduling; generate.py for the steps.
"""

import queue
import threading

import torch

from .decoder import KVCache
from .generate import decode_step, prefill, sample


class Job:
    """One request: prompt ids (list), pixel values (N,3,S,S) or None, sampling settings; its results
    arrive as events on a queue that the caller reads with stream()."""

    def __init__(self, ids, pixels=None, max_new=64, temperature=0.0, top_p=None, top_k=None, seed=None, stop=()):
        self.ids, self.pixels, self.max_new = list(ids), pixels, max_new
        self.temperature, self.top_p, self.top_k, self.seed = temperature, top_p, top_k, seed
        self.stop = [s for s in stop if s]
        self.events = queue.Queue()
        self.cancelled = False  # set by the caller (a client that went away): the row leaves the batch
        self.out, self.sent, self.finish = [], 0, None  # sampled ids, characters sent, finish reason
        self.generator = None

    def stream(self):
        """The events until the last: ("text", piece)*, then ("done", finish, n_tokens) or ("error", exc)."""
        while True:
            event = self.events.get()
            yield event
            if event[0] != "text":
                return


class Batcher:
    def __init__(self, model, eos_token_ids, decode, max_batch=8):
        self.model, self.eos, self.decode, self.max_batch = model, set(eos_token_ids), decode, max_batch
        self.waiting = queue.Queue()
        self.stats = {"requests": 0, "steps": 0, "max_rows": 0}
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, job):
        self.waiting.put(job)
        return job

    # ------------------------------------------------------------------------------ the worker thread
    def _take(self, block, room):
        jobs = [self.waiting.get()] if block else []
        while len(jobs) < room:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return [j for j in jobs if not j.cancelled]

    def _loop(self):
        rows, cache, mask = [], None, None  # the running batch: jobs, KVCache, (B, L) 0/1 padding mask
        while True:
            new = self._take(block=not rows, room=self.max_batch - len(rows))
            with torch.no_grad():  # grad mode is per thread
                if new:  # a failure here (a bug) fails the new requests only; the running ones go on
                    rows, cache, mask = self._guard(new, self._admit, new, rows, cache, mask) or (rows, cache, mask)
                if rows:
                    rows, cache, mask = self._guard(rows, self._step, rows, cache, mask) or ([], None, None)

    @staticmethod
    def _guard(jobs, fn, *args):
        """fn(*args), or None after telling each unfinished job of the exception: the server keeps serving."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (sent to the jobs' clients as a 500)
            for job in jobs:
                if job.finish is None:
                    job.finish = "error"
                    job.events.put(("error", e))

    def _admit(self, new, rows, cache, mask):
        """Prefill the new prompts as one left-padded batch and merge them into the running one."""
        self.stats["requests"] += len(new)
        width = max(len(j.ids) for j in new)
        pad = [[0] * (width - len(j.ids)) for j in new]
        ids = torch.tensor([p + j.ids for p, j in zip(pad, new)], device=self.model.device)  # (Bn, P)
        new_mask = torch.tensor([[0] * len(p) + [1] * len(j.ids) for p, j in zip(pad, new)], device=ids.device)
        pixels = [j.pixels for j in new if j.pixels is not None]  # in row order, as the model fills them
        pixels = torch.cat(pixels) if pixels else None
        new_cache = KVCache(self.model.cfg.text, len(new), width, self.model.dtype, self.model.device)
        for j in new:  # each sampling row has its own generator: what it draws does not depend on the others
            if j.temperature > 0:
                j.generator = torch.Generator(device=ids.device)
                if j.seed is not None:
                    j.generator.manual_seed(j.seed)
                else:
                    j.generator.seed()
        logits = prefill(self.model, ids, pixels, new_mask, new_cache)  # (Bn, V)
        keep = [i for i, j in enumerate(new) if self._accept(j, logits[i:i + 1])]
        if not keep:
            return rows, cache, mask
        new = [new[i] for i in keep]
        new_cache.k, new_cache.v, new_mask = new_cache.k[:, keep], new_cache.v[:, keep], new_mask[keep]
        return self._merge(rows, cache, mask, new, new_cache, new_mask)

    def _merge(self, rows, cache, mask, new, new_cache, new_mask):
        """One cache for old and new rows, right-aligned, with room for every row's remaining tokens."""
        old_len = cache.length if rows else 0
        length = max(old_len, new_cache.length)
        everyone = rows + new
        room = length + max(j.max_new - len(j.out) for j in everyone)
        merged = KVCache(self.model.cfg.text, len(everyone), room, self.model.dtype, self.model.device)
        merged_mask = torch.zeros(len(everyone), length, dtype=torch.long, device=new_mask.device)
        for c, m, lo, hi in ((cache, mask, 0, len(rows)), (new_cache, new_mask, len(rows), len(everyone))):
            if hi > lo:
                n = c.length
                merged.k[:, lo:hi, :, length - n:length] = c.k[:, :, :, :n]  # (L, B, n_kv, T, hs)
                merged.v[:, lo:hi, :, length - n:length] = c.v[:, :, :, :n]
                merged_mask[lo:hi, length - n:] = m
        merged.length = length
        return everyone, merged, merged_mask

    def _step(self, rows, cache, mask):
        """One decode step for every row; finished rows leave, unused left columns are trimmed."""
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        tokens = torch.tensor([j.out[-1] for j in rows], device=mask.device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (B, L + 1)
        logits = decode_step(self.model, tokens, mask, cache)
        keep = [i for i, j in enumerate(rows) if self._accept(j, logits[i:i + 1]) and not j.cancelled]
        if len(keep) == len(rows):
            return rows, cache, mask
        if not keep:
            return [], None, None
        rows, mask = [rows[i] for i in keep], mask[keep]
        first = int(mask.any(0).nonzero()[0])  # columns left of it are padding for every remaining row
        cache.k, cache.v = cache.k[:, keep, :, first:], cache.v[:, keep, :, first:]  # (L, B', n_kv, T', hs)
        cache.length, cache.max_len = cache.length - first, cache.max_len - first
        return rows, cache, mask[:, first:]

    def _accept(self, job, logits):
        """Sample job's next token from logits (1, V), send the new text; False when the job is finished."""
        if job.temperature > 0:
            token = int(sample(logits, job.temperature, job.top_k, job.top_p, job.generator))
        else:
            token = int(logits.argmax(-1))
        job.out.append(token)
        ended = token in self.eos
        text = self.decode(job.out)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        if ended or len(job.out) >= job.max_new:
            job.finish = "stop" if ended else "length"
            self._send(job, text[job.sent:])
            job.events.put(("done", job.finish, len(job.out)))
            return False
        if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            return True
        # hold back what could be the start of a stop string
        safe = len(text) - max((len(s) - 1 for s in job.stop), default=0)
        if safe > job.sent:
            self._send(job, text[job.sent:safe])
        return True

    @staticmethod
    def _send(job, piece):
        if piece:
            job.events.put(("text", piece))
            job.sent += len(piece)
