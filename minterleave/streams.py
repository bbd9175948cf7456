"""Which samples each training step sees: a pure function of (seed, step), so that DataLoader workers,
--resume and DDP ranks all agree without sharing any state.

A stream maps a global sample index g to one encoded sample (data.encode_sample / data.encode_record):
- SyntheticStream: synthetic tasks made on the fly from seeds in the training range (data.train_seed),
  domains in a repeating, weighted order (domain_cycle), question types optionally weighted too
  (qtype_cycles) while answers stay balanced;
- RecordStream: an M4-Instruct-style JSON dataset, reshuffled each epoch from the seed.
micro_batches cuts the samples of one optimizer step into per-rank micro-batches so that any
(world size, gradient accumulation) split of the same global batch sees the same samples.
"""

import torch

from . import data, tasks


class SyntheticStream:
    """Global sample index g → encoded synthetic sample. `cycle` is the repeating order of domains (a domain
    listed twice gets twice the samples); the k-th sample of a domain has seed data.train_seed(seed, k), or,
    for a domain whose question types are weighted (`qtype_cycles[domain]`, a repeating order of qtype
    indices), the o-th seed >= data.train_seed(seed, 0) that tasks.make_sample turns into that question
    type (the qtype is seed mod the number of types, so consecutive choices stay balanced in answers)."""

    def __init__(self, cycle, seed, proc, image_size, num_frames, qtype_cycles=None):
        self.cycle, self.seed, self.proc = list(cycle), seed, proc
        self.qtype_cycles = qtype_cycles or {}
        self.opts = dict(image_size=image_size, num_frames=num_frames)

    def sample_seed(self, d, k):
        qc = self.qtype_cycles.get(d)
        if not qc:
            return data.train_seed(self.seed, k)
        nq = len(tasks.QTYPES[d])
        n, j = divmod(k, len(qc))
        q = qc[j]
        o = n * qc.count(q) + qc[:j].count(q)
        base = data.train_seed(self.seed, 0)
        seed = base - base % nq + nq * (o + 1) + q
        assert seed < data.train_seed(self.seed + 1, 0)
        return seed

    def __call__(self, g):
        n, j = divmod(g, len(self.cycle))
        d = self.cycle[j]
        k = n * self.cycle.count(d) + self.cycle[:j].count(d)
        seed = self.sample_seed(d, k)
        return data.encode_sample(self.proc, tasks.make_sample(d, seed, **self.opts), f"{d}/{seed}")


def weighted_cycle(spec, names, flag):
    """"A=3,B=2" over names → the repeating order in which each name appears its weight times (default 1)."""
    w = {n: 1 for n in names}
    for kv in filter(None, spec.split(",")):
        name, _, n = kv.partition("=")
        if name not in w:
            raise ValueError(f"{flag}: {name!r} is not one of {', '.join(names)}")
        w[name] = int(n)
    return [name for rep in range(max(w.values())) for name in names if w[name] > rep]


def domain_cycle(domain, weights):
    """The domain order of one cycle: "all" = every domain once, each repeated by --domain-weights. A question
    type of tasks.EXTRA joins "all" only where --domain-weights names it (which_colour=4), so that a new one can
    be learnt beside the others (README, the LoRA example) while a plain "all" stays the four domains."""
    named = {kv.partition("=")[0] for kv in weights.split(",")}
    names = (*tasks.DOMAINS, *(e for e in tasks.EXTRA if e in named)) if domain == "all" else (domain,)
    return weighted_cycle(weights, names, "--domain-weights")


def qtype_cycles(spec):
    """--qtype-weights "multi_image/which_image=3,..." → {domain: repeating order of qtype indices}."""
    out = {}
    for kv in filter(None, spec.split(",")):
        d, _, rest = kv.partition("/")
        if d not in tasks.QTYPES:
            raise ValueError(f"--qtype-weights: {kv!r} should read DOMAIN/QTYPE=N, DOMAIN one of {', '.join(tasks.DOMAINS)}")
        out.setdefault(d, []).append(rest)
    return {d: [tasks.QTYPES[d].index(q) for q in weighted_cycle(",".join(v), tasks.QTYPES[d], "--qtype-weights")]
            for d, v in out.items()}


class RecordStream:
    """Global sample index g → record perm_e[g mod N] of a JSON dataset, perm_e a permutation per epoch e."""

    def __init__(self, dataset, seed):
        self.ds, self.seed, self.perm, self.epoch = dataset, seed, None, None

    def __call__(self, g):
        n = len(self.ds)
        e = g // n
        if e != self.epoch:
            self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + e)).tolist()
            self.epoch = e
        return self.ds[self.perm[g % n]]


class StepBatches(torch.utils.data.Dataset):
    """Item i = the micro-batches of optimizer step start_step + i (for DataLoader workers; deterministic,
    so any number of workers gives the same batches)."""

    def __init__(self, stream, offset, batch_size, grad_accum, rank, world, pad_id, n_steps):
        self.stream, self.offset, self.n = stream, offset, n_steps
        self.step_size = batch_size * grad_accum * world  # global samples per optimizer step
        self.split = dict(batch_size=batch_size, grad_accum=grad_accum, rank=rank, world=world, pad_id=pad_id)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return micro_batches(self.stream, self.offset + i * self.step_size, **self.split)


def micro_batches(stream, offset, batch_size, grad_accum, rank, world, pad_id):
    """The micro-batches of one optimizer step for this rank. Micro m of rank r holds global samples
    offset + (m * world + r) * B + [0, B): the same samples, in the same micro-batch grouping, as one
    process with batch world * B."""
    B = batch_size
    out = []
    for m in range(grad_accum):
        start = offset + (m * world + rank) * B
        out.append(data.collate([stream(g) for g in range(start, start + B)], pad_id, with_ids=True))
    return out
