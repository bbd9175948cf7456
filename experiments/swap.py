"""How much the last prompt position's residual stream moves, layer by layer, when the question's colour
word or its shape word is swapped (same images). Tells whether the shape word reaches the position
that answers."""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, minterleave as mi
from minterleave import tasks, data
from minterleave.tasks_render import COLOURS, SHAPES
path = sys.argv[1]
model = mi.Model.from_pretrained(path).eval(); proc = mi.Processor.from_pretrained(path)
outs = []
for blk in model.decoder.layers:
    blk.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
def last_states(s, q):
    outs.clear()
    s2 = tasks.Sample(**{**s.__dict__, "question": q})
    inp = proc([data.prompt_for(s2)], images=s.images)
    with torch.no_grad():
        logits = model(**inp)
    return [o[0, -1] for o in outs], logits[0, -1].softmax(-1)
dc, ds, n = torch.zeros(len(model.decoder.layers)), torch.zeros(len(model.decoder.layers)), 0
pc = ps = 0.0
i = 0
while n < 60:
    s = tasks.make_sample("multi_image", tasks.sample_seed(7, i), proc.image_size); i += 1
    if s.qtype != "which_image":
        continue
    import re; col, shp = re.search(r"has a (\w+) (\w+)\?", s.question).groups()
    col2 = COLOURS[(COLOURS.index(col) + 1) % 4]; shp2 = SHAPES[(SHAPES.index(shp) + 1) % 3]
    base, p0 = last_states(s, s.question)
    a, p1 = last_states(s, s.question.replace(f"{col} {shp}", f"{col2} {shp}"))
    b, p2 = last_states(s, s.question.replace(f"{col} {shp}", f"{col} {shp2}"))
    for l in range(len(base)):
        dc[l] += (a[l] - base[l]).norm() / base[l].norm(); ds[l] += (b[l] - base[l]).norm() / base[l].norm()
    pc += 0.5 * (p1 - p0).abs().sum().item(); ps += 0.5 * (p2 - p0).abs().sum().item()
    n += 1
print("relative change of the last position's residual per layer")
print("  swap colour:", [f"{v:.1e}" for v in (dc / n).tolist()])
print("  swap shape: ", [f"{v:.1e}" for v in (ds / n).tolist()])
print(f"total-variation change of the next-token distribution: colour {pc / n:.3f}, shape {ps / n:.3f}")
