"""LLaVA-NeXT-Interleave: SigLIP tower -> projector -> Qwen2 decoder, one interleaved sequence.

Every image (a photo of a multi-image prompt, a video frame, a 3D view or a multi-patch tile)
becomes (S/patch)^2 feature vectors. The processor has already expanded each `<image>`
placeholder to that many image tokens; the model embeds the text, then writes the projected
features into those positions in order (a masked scatter), and runs the decoder over it all.
References: Li et al. 2024, "LLaVA-NeXT-Interleave" (arXiv 2407.07895); Liu et al. 2023 (LLaVA-1.5);
transformers' modeling_llava.py, whose logits this module reproduces.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import IGNORE_INDEX, ModelConfig, load_config, special_tokens
from .decoder import Decoder
from .projector import Projector
from .vision import VisionTower, sincos_2d
from . import hub, weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, cfg.vision_layers_used)
        self.projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.decoder = Decoder(cfg.text)
        self.eos_token_ids = []  # generate's default stop ids: from_pretrained reads config.special_tokens
        # FSDP (distributed.py): every process must run every sharded layer, so a training batch without images
        # still runs the vision tower, on one blank image whose features count zero times
        self.always_run_vision = False

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, check_finite=True, adapter=None,
                        quantize=None, group_size=None):
        """Load a checkpoint folder (config.json + safetensors, any supported layout) or a hub id.

        A missing folder, config.json or weights file is a FileNotFoundError (a file given as the folder a
        NotADirectoryError); bad content a ConfigError or WeightsError (ValueErrors); each one line naming the
        file. check_finite: a tensor holding NaN or Inf (or, loading in float16, values beyond its range) is
        a WeightsError naming the tensor and its file. The check is one min/max reduction per tensor as it is
        read; on the 0.5B model (864M values, 2 CPU cores, median of 3) loading takes ~0.55 s instead of
        ~0.35 s in bfloat16 and ~1.35 s instead of ~1.0 s in float32. check_finite=False skips it.
        adapter: a LoRA adapter folder (PEFT's format) or hub id, added unmerged (lora.load_adapter).
        quantize: "int8" (per-row scales) or "int4" (group_size 32, 64 or 128) weight-only decoder, quantized
        matrix by matrix while loading (qcheckpoint.py: the float decoder is never resident). A folder written
        by qcheckpoint.save_quantized loads quantized as saved (quantize must then be None or its scheme)."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {list(DTYPES)}")
        path = hub.resolve(path)  # a folder, or a hub id fetched into the hub cache
        cfg = load_config(path)
        where = weights.weight_files(path)  # fail on a folder without weights before allocating
        # build on the meta device, then allocate each parameter once, in the target dtype
        with torch.device("meta"):
            model = cls(cfg).to(dtype)  # free: meta tensors have no storage
        from . import qcheckpoint
        saved = qcheckpoint.saved_scheme(path)
        if saved is not None:
            if quantize not in (None, saved["scheme"]) or group_size not in (None, saved.get("group_size")):
                raise ValueError(f"{path} holds a {saved['scheme']} checkpoint (group size {saved.get('group_size')}); "
                                 f"it cannot be loaded as {quantize} (group size {group_size})")
            qcheckpoint.load_saved(model, path, where, check_finite, device)
        elif quantize is not None:
            qcheckpoint.load_quantizing(model, path, cfg, where, check_finite, quantize, group_size, device)
        else:
            model = model.to_empty(device=device)
            weights.load_weights(model, path, cfg, where, check_finite)
        model.eos_token_ids = special_tokens(path)["eos"]
        if adapter is not None:
            from .lora import load_adapter
            load_adapter(model, adapter)
        return model.eval()

    @torch.no_grad()
    def init_weights(self, std=0.02, pos_scale=0.5):
        """Initialisation for training from scratch, GPT-2 style: normal(0, std) matrices and embeddings,
        residual outputs scaled by 1/sqrt(2 * layers), zero biases, unit norms. The ViT's position
        embedding starts as a 2D sine-cosine table (times pos_scale; still learned), so patches know where
        they are from the first step. Returns self."""
        n_res = 2 * (len(self.decoder.layers) + len(self.vision.layers))
        for name, p in self.named_parameters():
            if name == "vision.position_embedding.weight" and pos_scale:
                p.copy_(pos_scale * sincos_2d(int(round(math.sqrt(p.shape[0]))), p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")):
                p.normal_(0, std / math.sqrt(n_res))
            else:
                p.normal_(0, std)
        return self

    def set_grad_checkpointing(self, on=True):
        """Activation checkpointing for training: each decoder and vision layer keeps only its input and is
        recomputed in backward (non-reentrant torch.utils.checkpoint), trading one extra forward for the
        activations of all layers but one. Same loss and gradients. Returns self."""
        self.decoder.grad_checkpoint = self.vision.grad_checkpoint = bool(on)
        return self

    @property
    def dtype(self):
        return self.decoder.norm.weight.dtype  # (embeddings may be int8 after quantize_int8)

    @property
    def device(self):
        return self.decoder.norm.weight.device

    def image_features(self, pixel_values):
        """(N, 3, S, S) -> (N, tokens_per_image, hidden): all images of a call in one batch."""
        x = self.vision(pixel_values)  # (N, P, vision_dim), the last block's output, no post_layernorm
        if self.cfg.feature_select == "default":
            x = x[:, 1:]  # drop the first slot, as for towers that carry a CLS token there
        return self.projector(x)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features written into the image-token positions."""
        h = self.decoder.embed_tokens(input_ids)  # (B, T, C)
        is_image = input_ids == self.cfg.image_token_id
        n_tokens, per_image = int(is_image.sum()), self.cfg.tokens_per_image
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tokens != n_images * per_image:
            raise ValueError(f"input_ids hold {n_tokens} image tokens but {n_images} images were given "
                             f"({per_image} tokens each, so {n_images * per_image} expected)")
        if n_images:
            feats = self.image_features(pixel_values.to(device=h.device, dtype=h.dtype))
            h = h.masked_scatter(is_image[..., None], feats.to(h.dtype))  # fills positions in order
        elif self.always_run_vision and torch.is_grad_enabled():
            size = self.cfg.vision.image_size
            blank = h.new_zeros(1, 3, size, size)
            h = h + 0.0 * self.image_features(blank).sum()  # the same collectives; no change to h or the gradients
        return h

    @staticmethod
    def positions_and_mask(attention_mask, past: int = 0):
        """From a (B, past + T) 0/1 padding mask: positions (B, T) and attention mask (B, 1, T, past + T).

        Positions count real tokens only, so a left-padded prompt gets the positions it would
        have alone. Every query may also see itself, so rows of padding never have zero keys
        (their outputs are garbage but finite, and nothing real attends to them).
        """
        keep = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        T = positions.shape[1]
        mask = keep[:, None, None, :].expand(-1, 1, T, -1).clone()  # (B, 1, T, past + T)
        idx = torch.arange(T, device=mask.device)
        mask[:, 0, idx, past + idx] = True
        return positions, mask

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, num_items_in_batch=None,
                return_logits=True, cache=None, last_only=False):
        """input_ids (B, T) -> logits (B, T, vocab) float; with labels, (logits, loss).

        attention_mask: (B, T) 0/1 for padded batches. last_only: logits of the last position only
        (generation needs nothing else). labels (B, T): the token ids to predict, -100 where nothing is
        supervised; position t predicts labels[t + 1] (the shift happens here, as in transformers). The
        loss is the summed token cross-entropy divided by num_items_in_batch (transformers' argument for
        gradient accumulation: the supervised tokens of the whole global batch), by default by the
        supervised tokens of this call. Only the supervised positions go through the output head;
        return_logits=False skips the full (B, T, vocab) logits too and returns (None, loss): that is
        the training path. (The official models' head has 152,000 rows: 0.6 MB of fp32 logits per position, so
        a one-image sample of 758 tokens holds 461 MB of logits on the full path, 10 MB for a 16-token answer
        on the lean one, and as much again for their gradients.)
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past and pixel_values is None:  # a decode step: a sampled <image> id is just a token
            h = self.decoder.embed_tokens(input_ids)
        else:
            h = self.embed(input_ids, pixel_values)
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(past, past + T, device=h.device).expand(B, T)
            mask = None
        else:
            positions, mask = self.positions_and_mask(attention_mask, past)
        h = self.decoder(h, positions, cache, mask)  # (B, T, C)
        logits = self.decoder.logits(h[:, -1:] if last_only else h).float() if return_logits else None
        if labels is None:
            return logits
        target = labels[:, 1:].to(h.device)
        supervised = target != IGNORE_INDEX  # (B, T-1)
        picked = self.decoder.logits(h[:, :-1][supervised]).float()  # (n, vocab)
        loss = F.cross_entropy(picked, target[supervised], reduction="sum")
        return logits, loss / (supervised.sum() if num_items_in_batch is None else num_items_in_batch)

    def prepare_for_inference(self, checkpoint=None):
        """Inference-only decode speed-ups on a CPU (packing.py): the decoder's weights move to
        oneDNN's packed layout (bf16: bit-identical; fp32: same greedy tokens, logits within ~1e-6
        relative). Training needs the plain layers, so this is a separate, explicit step; returns self.

        checkpoint: the folder the weights were loaded from. With it, a tied head is packed too and the
        embedding lookup reads its rows from that file (no second in-memory copy of the matrix)."""
        from .packing import pack_decoder
        source = weights.embedding_location(checkpoint, self.cfg) if checkpoint is not None else None
        pack_decoder(self.decoder, source)
        return self.eval()

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, temperature=0.0,
                 top_k=None, top_p=None, seed=None, eos_token_id=None, pad_token_id=None, stream=None):
        """New token ids (B, n): greedy unless temperature > 0. See minterleave/generate.py."""
        from .generate import generate
        return generate(self, input_ids, pixel_values, attention_mask, max_new_tokens, temperature, top_k, top_p,
                        seed, eos_token_id, pad_token_id, stream)
