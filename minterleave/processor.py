"""Text + media → model inputs: tokenizer, chat template, `<image>` expansion, decoding.

Mirrors transformers' LlavaProcessor for the llava-interleave checkpoints (same ids, same pixels), with
the interleave extras on top:

    proc = Processor.from_pretrained(path)
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "What changed?"}]}])
    inputs = proc(prompt, images=[img_a, img_b])   # {"input_ids": (1,T) long, "attention_mask": (1,T) long,
                                                   #  "pixel_values": (N,3,S,S) float32}

* Images: each `<image>` costs `tokens_per_image` = (S // patch)^2 (+ extra, −1 for "default") ids
  (729 for the official 384/14 models); images are consumed in order of appearance.
  No image → no "pixel_values" key (as LlavaProcessor; the model takes pixel_values=None).
* Video: write `<video>` where the clip goes (the chat template renders a {"type": "video"} item as
  `<video>`); pass `videos=[path or (T,H,W,3) array]`. K frames (argument `num_frames`, else the config's
  `num_frames`, else 16) are sampled at `np.linspace(0, n-1, K).astype(int)` and the placeholder becomes
  K consecutive `<image>` (no separator): K × tokens_per_image ids. The frame indices and timestamps
  (seconds; None for arrays) of the last call are in `proc.last_video_frame_indices` and
  `proc.last_video_timestamps` (one list per video).
* 3D / multi-view: the views are just images, one `<image>` per view, e.g.
  `"<image><image><image>\\nHow many cubes are there?"` with `images=[view0, view1, view2]`.
* Multi-patch (AnyRes) single image: `multi_patch=True` turns each image of the call (meant for a
  single-image prompt) into a downscaled overview first, then the row-major S×S tiles of the
  LLaVA-NeXT best-fit grid (see media.anyres_tiles; grids of 1×2, 2×1, 2×2, 3×1, 1×3 tiles by
  default, or the config's `image_grid_pinpoints` in pixels); its one `<image>` becomes 1 + n_tiles
  `<image>`, i.e. (1 + n_tiles) × tokens_per_image ids (up to 5 × 729 = 3645 for the official models).
* A batch (`text` as a list) is LEFT-padded with `pad_token_id`; `attention_mask` marks real tokens.
"""

import json
import os
import re

import numpy as np
import torch

from . import media

VIDEO_TOKEN = "<video>"


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def _square_size(size):
    if size is None or isinstance(size, int):
        return size
    if "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise ValueError(f"only square image sizes are supported, got {size}")
        return int(size["height"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise ValueError(f"cannot read the image size from {size}")


def _listify(x):
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


class Processor:
    """Tokenizer + image/video preprocessing for LLaVA-NeXT-Interleave (see the module docstring)."""

    def __init__(self, tokenizer, image_size=384, patch_size=14, num_additional_image_tokens=0,
                 vision_feature_select_strategy="full", image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255, resample=media.BICUBIC,
                 do_resize=True, do_rescale=True, do_normalize=True, image_token="<image>",
                 eos_token_ids=None, pad_token_id=None, num_frames=16, max_length=None,
                 grid_pinpoints=None, chat_template=None):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.tokens_per_image = (self.image_size // self.patch_size) ** 2 + int(num_additional_image_tokens)
        if vision_feature_select_strategy == "default":
            self.tokens_per_image -= 1
        self.pixel_kwargs = dict(mean=tuple(image_mean), std=tuple(image_std), rescale_factor=rescale_factor,
                                 resample=int(resample), do_resize=do_resize, do_rescale=do_rescale,
                                 do_normalize=do_normalize)
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"the tokenizer has no {image_token!r} token")
        vocab_ids = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        eos = list(eos_token_ids or []) + [i for i in vocab_ids if i is not None]
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in eos))
        if pad_token_id is None:
            pad_token_id = tokenizer.token_to_id("<|endoftext|>")
        if pad_token_id is None and self.eos_token_ids:
            pad_token_id = self.eos_token_ids[0]
        self.pad_token_id = pad_token_id
        self.num_frames = int(num_frames)
        self.max_length = max_length
        self.grid_pinpoints = grid_pinpoints
        self.chat_template = chat_template  # the checkpoint's jinja text, for reference only
        self.last_video_frame_indices = []
        self.last_video_timestamps = []
        self._placeholder = re.compile(f"({re.escape(image_token)}|{re.escape(VIDEO_TOKEN)})")

    @classmethod
    def from_pretrained(cls, path):
        """Read tokenizer.json and the processor/preprocessor/tokenizer/generation configs of `path`."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ValueError(f"no tokenizer.json in {path}")
        tokenizer = Tokenizer.from_file(tok_file)
        j = lambda name: _read_json(os.path.join(path, name)) or {}  # noqa: E731
        proc_cfg, cfg, tok_cfg = j("processor_config.json"), j("config.json"), j("tokenizer_config.json")
        pre = j("preprocessor_config.json") or proc_cfg.get("image_processor") or {}
        smap, gen = j("special_tokens_map.json"), j("generation_config.json")
        vision = cfg.get("vision_config") or {}
        text = cfg.get("text_config") or {}

        eos = gen.get("eos_token_id")
        eos = [] if eos is None else _listify(eos)
        for name in (_token_str(tok_cfg.get("eos_token")), _token_str(smap.get("eos_token"))):
            if name and tokenizer.token_to_id(name) is not None:
                eos.append(tokenizer.token_to_id(name))
        pad = _token_str(tok_cfg.get("pad_token")) or _token_str(smap.get("pad_token"))
        pad_id = tokenizer.token_to_id(pad) if pad else None
        pinpoints = pre.get("image_grid_pinpoints") or cfg.get("image_grid_pinpoints")
        if not (isinstance(pinpoints, list) and all(isinstance(p, (list, tuple)) for p in pinpoints)):
            pinpoints = None
        chat_template = (j("chat_template.json").get("chat_template") or tok_cfg.get("chat_template"))
        return cls(
            tokenizer,
            image_size=_square_size(pre.get("size")) or vision.get("image_size") or 384,
            patch_size=proc_cfg.get("patch_size") or vision.get("patch_size") or 14,
            num_additional_image_tokens=proc_cfg.get("num_additional_image_tokens") or 0,
            vision_feature_select_strategy=(proc_cfg.get("vision_feature_select_strategy")
                                            or cfg.get("vision_feature_select_strategy") or "full"),
            image_mean=pre.get("image_mean") or (0.5, 0.5, 0.5),
            image_std=pre.get("image_std") or (0.5, 0.5, 0.5),
            rescale_factor=pre.get("rescale_factor") or 1 / 255,
            resample=pre.get("resample", media.BICUBIC),
            do_resize=pre.get("do_resize", True) is not False,
            do_rescale=pre.get("do_rescale", True) is not False,
            do_normalize=pre.get("do_normalize", True) is not False,
            image_token=proc_cfg.get("image_token") or "<image>",
            eos_token_ids=eos, pad_token_id=pad_id,
            num_frames=proc_cfg.get("num_frames") or pre.get("num_frames") or 16,
            max_length=text.get("max_position_embeddings") or cfg.get("max_position_embeddings"),
            grid_pinpoints=pinpoints, chat_template=chat_template,
        )

    # ------------------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages, add_generation_prompt=True):
        """HF-style messages → prompt, byte-identical to the llava-hf interleave jinja template.

        Per message: `<|im_start|>{role}\\n`, then the turn's media placeholders (`<image>` per image
        item, `<video>` per video item, in their order in the content list), then "\\n" + text for
        each text item, then `<|im_end|>\\n`; finally `<|im_start|>assistant\\n` if
        add_generation_prompt. No system prompt is inserted. Differences from the hub template
        (which would render nothing for them): video items become `<video>`, and a plain-string
        content is treated as one text item.
        """
        out = []
        for m in messages:
            content = m.get("content") or []
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            out.append("<|im_start|>" + m["role"] + "\n")
            for c in content:
                if c.get("type") == "image":
                    out.append(self.image_token)
                elif c.get("type") == "video":
                    out.append(VIDEO_TOKEN)
            for c in content:
                if c.get("type") == "text":
                    if "text" not in c:
                        raise ValueError(f"text item without a 'text' field: {c}")
                    out.append("\n" + c["text"])
            out.append("<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    # ----------------------------------------------------------------------------------- encoding
    def encode(self, text):
        """Plain tokenization (no placeholder expansion) → list of ids."""
        return self.tokenizer.encode(text).ids

    def image_pixels(self, image):
        """One image (PIL / uint8 array / path) → float32 numpy (3,S,S)."""
        return media.preprocess(media.to_rgb(image), self.image_size, **self.pixel_kwargs)

    def __call__(self, text, images=None, videos=None, num_frames=None, multi_patch=False):
        """Prompt(s) with `<image>`/`<video>` placeholders + media → input_ids, attention_mask, pixel_values."""
        texts = [text] if isinstance(text, str) else list(text)
        images, videos = _listify(images), _listify(videos)
        k = int(num_frames or self.num_frames)
        n_img = sum(t.count(self.image_token) for t in texts)
        n_vid = sum(t.count(VIDEO_TOKEN) for t in texts)
        for kind, n_ph, given in (("<image>", n_img, len(images)), ("<video>", n_vid, len(videos))):
            if n_ph != given:
                raise ValueError(f"prompt has {n_ph} {kind} placeholder(s) but {given} "
                                 f"{kind.strip('<>')}(s) were given")
        image_iter, video_iter = iter(images), iter(videos)
        pixels, seqs = [], []
        self.last_video_frame_indices, self.last_video_timestamps = [], []
        for t in texts:
            parts = []
            for piece in self._placeholder.split(t):
                if piece == self.image_token:
                    img = media.to_rgb(next(image_iter))
                    views = (media.anyres_tiles(img, self.image_size, self.grid_pinpoints)[0]
                             if multi_patch else [img])
                elif piece == VIDEO_TOKEN:
                    views, idx, times = media.video_to_frames(next(video_iter), k)
                    self.last_video_frame_indices.append(idx)
                    self.last_video_timestamps.append(times)
                else:
                    parts.append(piece)
                    continue
                pixels.extend(media.preprocess(v, self.image_size, **self.pixel_kwargs) for v in views)
                parts.append(self.image_token * (len(views) * self.tokens_per_image))
            ids = self.tokenizer.encode("".join(parts)).ids
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(f"prompt is {len(ids)} tokens long (images included) but the model's "
                                 f"context is {self.max_length} tokens")
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": mask}
        if pixels:
            out["pixel_values"] = torch.from_numpy(np.stack(pixels))
        return out

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, ids, skip_special_tokens=True):
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens=True):
        return StreamDecoder(self.tokenizer, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: `put(ids)` returns the new text, never a broken UTF-8 piece.

    Text is held back while the decoded tail ends with U+FFFD (an incomplete multi-byte character);
    `flush()` returns whatever is left at the end. The concatenation of all pieces equals
    `decode(all_ids)`.
    """

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids, self.prefix, self.read = [], 0, 0

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def put(self, ids):
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        self.ids.extend(int(i) for i in _listify(ids))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self):
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
