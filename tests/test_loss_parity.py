"""Training loss AND gradients against transformers' LlavaForConditionalGeneration.

One fp32 checkpoint (GQA, untied head, a 3-layer SigLIP of which the features take layer -2, so
2 layers run) and one right-padded batch as training builds it: several images interleaved in
text, a video given as an array, a multi-patch image (overview + tiles) and a text-only row, of
different lengths. The loss must equal transformers' within 1e-5 relative, and after backward()
every one of our parameters' gradients must equal the transformers gradient of the tensor(s) it
holds within 1e-5 max-abs; q/k/v (and gate/up) are fused here, so their rows are compared slice
by slice through the weights loader's own name map. Both the full-logits path and the lean
training path (only supervised positions through the output head) are checked, with transformers'
mean loss and with its `num_items_in_batch` (sum / N) convention for gradient accumulation.
Run with -s to see the error figures.
"""

import types

import numpy as np
import pytest
import torch

import minterleave as mi
from minterleave.data import collate
from minterleave.weights import tensor_map, unused_reason
from tiny_model import _renamed, hf_model, save_checkpoint
from tiny_tokenizer import write_tokenizer_files

LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-5
HF_ATTN = {"naive": "eager", "sdpa": "sdpa"}  # the same math on both sides

# (prompt, answer, media): every row is "<|im_start|>user ... <|im_end|>\n<|im_start|>assistant\n"
# followed by the supervised answer and its closing <|im_end|> (the model must learn to stop)
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"


def _image(rng, w, h):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, checkpoint dir, collated batch)."""
    path = str(tmp_path_factory.mktemp("loss_parity"))
    ids = write_tokenizer_files(path, vocab_size=512, image_size=28, patch_size=14)
    hf = hf_model(seed=7, vocab=ids["vocab_size"], image_token=ids["image_token_id"], image_size=28,
                  heads=4, kv_heads=2, tied=False, v_layers=3, feature_layer=-2)
    save_checkpoint(hf, path, "llava-hf")
    proc = mi.Processor.from_pretrained(path)

    rng = np.random.default_rng(0)
    rows = [  # (user text, answer, processor kwargs)
        ("Image 1: <image> Image 2: <image> and a third <image>\nWhich one is the brightest?",
         "The second one.", dict(images=[_image(rng, 40, 30), _image(rng, 20, 50), _image(rng, 33, 33)])),
        ("<video>\nWhat happens in this clip?", "A square moves to the right.",
         dict(videos=[_image(rng, 32, 32 * 5).reshape(5, 32, 32, 3)], num_frames=3)),
        ("<image>\nDescribe the picture.", "Two red circles on a wide grey strip.",
         dict(images=[_image(rng, 60, 28)], multi_patch=True)),
        ("What is two plus two?", "Four.", dict()),
    ]
    items = []
    for user, answer, media in rows:
        prefix = USER + user + END + "\n" + ASSISTANT
        full = proc(prefix + answer + END, **media)
        head = proc(prefix, **media)["input_ids"][0]
        input_ids = full["input_ids"][0]
        assert input_ids[:len(head)].tolist() == head.tolist(), "the answer must not change the prompt's tokens"
        labels = input_ids.clone()
        labels[:len(head)] = -100  # supervise the answer and its <|im_end|> only
        items.append({"input_ids": input_ids, "labels": labels, "pixel_values": full.get("pixel_values")})
    n_views = [0 if it["pixel_values"] is None else len(it["pixel_values"]) for it in items]
    assert n_views[0] == 3 and n_views[1] == 3 and n_views[2] >= 3 and n_views[3] == 0, n_views
    batch = collate(items, proc.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(items), "rows of different lengths, so padding happens"
    assert (batch["labels"] != -100).sum(1).min() >= 3
    return hf, path, batch


def hf_names(hf):
    """{transformers parameter name: llava-hf checkpoint name}, via the renaming the checkpoints use."""
    names = [n for n, _ in hf.named_parameters()]
    probe = types.SimpleNamespace(config=hf.config,
                                  state_dict=lambda: {n: torch.tensor(i) for i, n in enumerate(names)})
    return {names[int(t)]: ck for ck, t in _renamed(probe, "llava-hf").items()}


def reference(hf, batch, backend, **kw):
    """transformers' loss and {llava-hf name: gradient} for the batch."""
    hf.set_attn_implementation(HF_ATTN[backend])
    hf.zero_grad(set_to_none=True)
    loss = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
              attention_mask=batch["attention_mask"], labels=batch["labels"], **kw).loss
    loss.backward()
    renamed = hf_names(hf)
    return loss.detach(), {renamed[n]: p.grad for n, p in hf.named_parameters()}


def ours(path, batch, backend, **kw):
    """Our (logits, loss) and model with .grad filled."""
    model = mi.Model.from_pretrained(path)
    with mi.use_backend(backend):
        logits, loss = model(batch["input_ids"], pixel_values=batch["pixel_values"],
                             attention_mask=batch["attention_mask"], labels=batch["labels"], **kw)
    loss.backward()
    return logits, loss.detach(), model


def compare_gradients(model, ref_grads):
    """{our name or slice: max abs error}; fails if any of our parameters (or rows of one) is not
    compared, or if a transformers tensor with a gradient has no counterpart here."""
    cfg = model.cfg
    names = tensor_map(cfg, "llava-hf", cfg.vision_layers_used)
    params = dict(model.named_parameters())
    covered = {name: 0 for name in params}
    errors = {}
    for ck, grad in ref_grads.items():
        if ck not in names:
            assert unused_reason(ck, cfg, "llava-hf", cfg.vision_layers_used), f"{ck}: no counterpart here"
            assert grad is None or not grad.any(), f"{ck} is unused here but has a gradient in transformers"
            continue
        name, rows = names[ck]
        g = params[name].grad
        assert g is not None, f"{name} got no gradient"
        if rows is not None:
            g = g[rows[0]:rows[1]]
        ref = torch.zeros_like(g) if grad is None else grad  # e.g. nothing flows to it in either
        assert g.shape == ref.shape, (ck, name, g.shape, ref.shape)
        errors[f"{name}[{rows[0]}:{rows[1]}]" if rows else name] = (g - ref).abs().max().item()
        covered[name] += g.shape[0]
    uncovered = [n for n, p in params.items() if covered[n] != p.shape[0]]
    assert not uncovered, f"parameters not (fully) compared with transformers: {uncovered}"
    return errors


def check(hf, path, batch, backend, lean, **kw):
    ref_loss, ref_grads = reference(hf, batch, backend, **kw)
    extra = {"return_logits": False} if lean else {}
    logits, loss, model = ours(path, batch, backend, **extra, **kw)
    if lean:
        assert logits is None, "return_logits=False returns (None, loss)"
    else:
        with torch.no_grad():
            hf.set_attn_implementation(HF_ATTN[backend])
            ref_logits = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                            attention_mask=batch["attention_mask"]).logits
        real = batch["attention_mask"].bool()  # padded positions are garbage on both sides
        assert logits.shape == ref_logits.shape
        assert (logits - ref_logits)[real].abs().max() <= GRAD_ATOL
    rel = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    errors = compare_gradients(model, ref_grads)
    worst = max(errors, key=errors.get)
    print(f"\n[{backend}, {'lean' if lean else 'full logits'}{', ' + str(kw) if kw else ''}] "
          f"loss {loss.item():.6f} vs {ref_loss.item():.6f}: rel err {rel:.2e}; "
          f"{len(errors)} gradients, worst max-abs err {errors[worst]:.2e} ({worst})")
    assert rel <= LOSS_RTOL, (loss.item(), ref_loss.item())
    assert errors[worst] <= GRAD_ATOL, {k: v for k, v in errors.items() if v > GRAD_ATOL}
    # the comparison is not vacuous: the gradients are far from zero where it matters
    assert ref_grads["language_model.lm_head.weight"].abs().max() > 1e-3
    assert ref_grads["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"].abs().max() > 1e-5
    return rel, errors[worst]


@pytest.mark.parametrize("lean", [False, True], ids=["full-logits", "lean"])
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_loss_and_gradients_match_transformers(setup, backend, lean):
    hf, path, batch = setup
    check(hf, path, batch, backend, lean)


@pytest.mark.parametrize("lean", [False, True], ids=["full-logits", "lean"])
def test_num_items_in_batch_matches_transformers(setup, lean):
    """Gradient accumulation: the token loss summed and divided by the whole batch's count N."""
    hf, path, batch = setup
    n = int((batch["labels"][:, 1:] != -100).sum()) * 3 + 1  # as if this were one of ~3 micro-batches
    check(hf, path, batch, "naive", lean, num_items_in_batch=n)


def _saved_bytes_and_grads(path, batch, grad_checkpoint):
    """(loss, {name: grad}, bytes the autograd graph holds for backward outside checkpointed layers)."""
    model = mi.Model.from_pretrained(path).set_grad_checkpointing(grad_checkpoint)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with mi.use_backend("naive"):  # backward too: it recomputes the checkpointed layers
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(batch["input_ids"], pixel_values=batch["pixel_values"],
                            attention_mask=batch["attention_mask"], labels=batch["labels"], return_logits=False)
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)


def test_activation_checkpointing_keeps_loss_and_gradients(setup):
    """--grad-checkpoint: each decoder and vision layer recomputed in backward: the same loss and gradients
    (<= 1e-6, fp32), and the graph holds far fewer activations."""
    _, path, batch = setup
    loss_a, grads_a, bytes_a = _saved_bytes_and_grads(path, batch, False)
    loss_b, grads_b, bytes_b = _saved_bytes_and_grads(path, batch, True)
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    print(f"\n[grad checkpoint] loss diff {abs(loss_a.item() - loss_b.item()):.1e}, worst gradient diff {worst:.1e}; "
          f"activations held for backward: {bytes_a / 1e6:.2f} MB without, {bytes_b / 1e6:.2f} MB with")
    assert worst <= 1e-6
    assert bytes_b < 0.5 * bytes_a
