import sys, math, torch
sys.path.insert(0, '/work/main')
torch.set_num_threads(1)
import minterleave as mi
from minterleave import tasks, data, decoder
path = sys.argv[1]
model = mi.Model.from_pretrained(path).eval(); proc = mi.Processor.from_pretrained(path)
rec = []
orig = decoder.attend
def attend(q, k, v, causal=True, mask=None):
    B, nh, T, hs = q.shape
    kk = k.repeat_interleave(nh // k.shape[1], 1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(hs)
    rec.append(s[0, :, -1].detach())   # (nh, T) logits of the last position
    return orig(q, k, v, causal=causal, mask=mask)
decoder.attend = attend
i = 0
while True:
    s = tasks.make_sample("multi_image", tasks.sample_seed(7, i), proc.image_size); i += 1
    if s.qtype == "which_image": break
inp = proc([data.prompt_for(s)], images=s.images)
ids = inp["input_ids"][0].tolist()
with torch.no_grad(): model(**inp)
toks = [proc.decode([t], skip_special_tokens=False) for t in ids]
col, shp = s.question.rstrip("?").split()[-2:]
ic = max(j for j, t in enumerate(toks) if t.strip() == col); ish = max(j for j, t in enumerate(toks) if t.strip() == shp)
for L, lg in enumerate(rec):
    p = lg.softmax(-1)
    print(f"layer {L}: logit range per head", [f"{(x.max()-x.min()).item():.0f}" for x in lg],
          "| p(colour word)", [f"{v:.1e}" for v in p[:, ic].tolist()], "p(shape word)", [f"{v:.1e}" for v in p[:, ish].tolist()],
          "| argmax tokens", [repr(toks[j]) for j in lg.argmax(-1).tolist()])
