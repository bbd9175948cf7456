import os, sys, collections
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, minterleave as mi
from minterleave import tasks, data
import eval as ev
path = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 600
model = mi.Model.from_pretrained(path); proc = mi.Processor.from_pretrained(path)
torch.set_num_threads(2)
smps = []
i = 0
while len(smps) < n:
    s = tasks.make_sample("multi_image", tasks.sample_seed(7, i), proc.image_size); i += 1
    if s.qtype == "which_image": smps.append(s)
stats = collections.defaultdict(lambda: [0, 0])
for b in range(0, n, 32):
    bs = smps[b:b+32]
    preds = ev.answer_batch(model, proc, [data.prompt_for(s) for s in bs], [im for s in bs for im in s.images])
    for s, p in zip(bs, preds):
        import re; col, shp = re.search(r"has a (\w+) (\w+)\?", s.question).groups()
        scenes = s.info["items"]
        ncol = sum(any(it["colour"] == col for it in sc) for sc in scenes)
        nshp = sum(any(it["shape"] == shp for it in sc) for sc in scenes)
        ok = p.strip() == s.answer
        pi = int(p.strip()) - 1 if p.strip() in "123" else None
        for k in ("all", f"place={s.placement}", f"ncol={ncol}", f"nshp={nshp}", f"ncol={ncol},nshp={nshp}"):
            stats[k][0] += ok; stats[k][1] += 1
        if pi is not None:
            stats["pred has colour"][0] += any(it["colour"] == col for it in scenes[pi]); stats["pred has colour"][1] += 1
            stats["pred has shape"][0] += any(it["shape"] == shp for it in scenes[pi]); stats["pred has shape"][1] += 1
for k in sorted(stats): print(f"{k:24s} {stats[k][0]/stats[k][1]:.3f}  ({stats[k][1]})")
