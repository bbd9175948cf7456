"""Text + media → model inputs: tokenizer, chat template, `<image>` expansion, decoding.

Mirrors transformers' LlavaProcessor for the llava-interleave checkpoints (same ids, same pixels), with
the interleave extras on top:

    proc = Processor.from_pretrained(path)
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "What changed?"}]}])
    inputs = proc(prompt, images=[img_a, img_b])   # {"input_ids": (1,T) long, "attention_mask": (1,T) long,
                                                   #  "pixel_values": (N,3,S,S) float32}
    item = proc.encode_chat(messages, images=[...])  # training: {"input_ids" (T,), "labels" (T,), "pixel_values"}

* The chat layout lives here and only here (`_render`): `apply_chat_template` (inference prompts) and
  `encode_chat` (training ids + label mask) both go through it. A message's content is either
  - a list of items (HF style): rendered exactly as the llava-hf interleave template renders it — the
    turn's media placeholders first (`<image>` per image item, `<video>` per video item, in order), then
    "\n" + text for each text item; or
  - a plain string: rendered verbatim, as Qwen2's own template and LLaVA's training code
    (`preprocess_qwen`) do; `<image>`/`<video>` placeholders inside it stay where they are. M4-Instruct
    records and the synthetic tasks are strings; the llava-hf template has no rendering for them.
  Each message is `<|im_start|>{role}\n{content}<|im_end|>\n`; no system prompt is inserted.
* Label mask (`encode_chat`): a token is supervised when it overlaps an assistant span — for list content
  the "\n" + text pieces the hub template wraps in `{% generation %}` (so the same tokens transformers'
  `apply_chat_template(..., return_assistant_tokens_mask=True)` marks), for string content the whole
  string — or the turn's closing `<|im_end|>` (the model must learn to stop). Everything else is -100.
* Images: each `<image>` costs `tokens_per_image` ids (config.tokens_per_image; 729 for the official
  384/14 models); images are consumed in order of appearance. No image → no "pixel_values" key.
* Video: `<video>` in the text, `videos=[path or (T,H,W,3) array]`. K frames (argument `num_frames`, else
  the checkpoint's, else 16) are sampled at `np.linspace(0, n-1, K).astype(int)` and the placeholder becomes
  K consecutive `<image>`: K × tokens_per_image ids. `video_frames(video)` returns the frames with their
  indices and timestamps, for callers that want to know which frames were used.
* 3D / multi-view: the views are just images, one `<image>` per view.
* Multi-patch (AnyRes) single image: `multi_patch=True` turns each image of the call into a downscaled
  overview, then the row-major S×S tiles of the LLaVA-NeXT best-fit grid (media.anyres_tiles); its one
  `<image>` becomes 1 + n_tiles `<image>` (up to 5 × 729 = 3645 ids for the official models).
* A batch (`text` as a list) is LEFT-padded with `pad_token_id`; `attention_mask` marks real tokens.
* Refused from the numbers, before any file is opened or frame decoded (one-line ValueError): text that is
  not valid Unicode or is empty, placeholder counts unlike the media's, `num_frames` < 1, and a prompt whose
  text tokens + tokens_per_image per image and per frame exceed the context (docs/data-flow.md).
"""

import os
import re

import numpy as np
import torch

from . import hub, media
from .video import check_num_frames, video_to_frames
from .config import DEFAULT_NUM_FRAMES, IGNORE_INDEX, read_json, special_tokens, tokens_per_image

VIDEO_TOKEN = "<video>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


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


def _valid_text(text, what="prompt"):
    """`text` if it is a str the tokenizer can take, else a one-line ValueError (not tokenizers' TypeError)."""
    if isinstance(text, (bytes, bytearray)):
        raise ValueError(f"{what} is bytes, not text: decode it first (e.g. .decode('utf-8'))")
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid text: {text[e.start]!r} at character {e.start} is an undecodable "
                         "byte (the file or argument is not UTF-8)") from None
    return text


def _frame_count(video, k):
    """Frames a video will give at K = k, known without decoding: K for a file, min(T, K) for T frames."""
    if isinstance(video, (str, os.PathLike)):
        return k
    return min(len(video), k) if hasattr(video, "__len__") else k


class Processor:
    """Tokenizer + image/video preprocessing for LLaVA-NeXT-Interleave (see the module docstring)."""

    def __init__(self, tokenizer, image_size=384, patch_size=14, num_additional_image_tokens=0,
                 vision_feature_select_strategy="full", image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255, resample=media.BICUBIC,
                 do_resize=True, do_rescale=True, do_normalize=True, image_token="<image>",
                 eos_token_ids=(), pad_token_id=None, num_frames=DEFAULT_NUM_FRAMES, max_length=None,
                 grid_pinpoints=None, chat_template=None):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.tokens_per_image = tokens_per_image(self.image_size, self.patch_size, num_additional_image_tokens,
                                                 vision_feature_select_strategy)
        self.pixel_kwargs = dict(mean=tuple(image_mean), std=tuple(image_std), rescale_factor=rescale_factor,
                                 resample=int(resample), do_resize=do_resize, do_rescale=do_rescale,
                                 do_normalize=do_normalize)
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"the tokenizer has no {image_token!r} token")
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.pad_token_id = pad_token_id if pad_token_id is not None else (
            self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.num_frames = check_num_frames(int(num_frames))
        self.max_length = max_length
        self.grid_pinpoints = grid_pinpoints
        self.chat_template = chat_template  # the checkpoint's jinja text, for reference only
        self._placeholder = re.compile(f"({re.escape(image_token)}|{re.escape(VIDEO_TOKEN)})")

    @classmethod
    def from_pretrained(cls, path):
        """Read tokenizer.json and the processor/preprocessor/tokenizer/generation configs of `path`."""
        from tokenizers import Tokenizer

        path = hub.resolve(path)  # a folder, or a hub id fetched into the hub cache
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tokenizer = Tokenizer.from_file(tok_file)
        j = lambda name: read_json(os.path.join(path, name)) or {}  # noqa: E731
        proc_cfg, cfg, tok_cfg = j("processor_config.json"), j("config.json"), j("tokenizer_config.json")
        pre = j("preprocessor_config.json") or proc_cfg.get("image_processor") or {}
        vision = cfg.get("vision_config") or {}
        text = cfg.get("text_config") or {}
        special = special_tokens(path)
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
            eos_token_ids=special["eos"], pad_token_id=special["pad"],
            num_frames=proc_cfg.get("num_frames") or pre.get("num_frames") or DEFAULT_NUM_FRAMES,
            max_length=(text.get("max_position_embeddings") or cfg.get("max_position_embeddings")
                        or tok_cfg.get("model_max_length")),
            grid_pinpoints=pinpoints, chat_template=chat_template,
        )

    # ------------------------------------------------------------------------------ chat layout
    def _render(self, messages, add_generation_prompt):
        """The one chat layout: messages → [(text piece, supervised?)] (see the module docstring)."""
        pieces = []
        for m in messages:
            role, content = m["role"], m.get("content")
            assistant = role == "assistant"
            pieces.append((f"{IM_START}{role}\n", False))
            if isinstance(content, str):
                pieces.append((content, assistant))
            else:
                content = content or []
                for c in content:
                    if c.get("type") == "image":
                        pieces.append((self.image_token, False))
                    elif c.get("type") == "video":
                        pieces.append((VIDEO_TOKEN, False))
                for c in content:
                    if c.get("type") == "text":
                        if "text" not in c:
                            raise ValueError(f"text item without a 'text' field: {c}")
                        pieces.append(("\n" + c["text"], assistant))
            pieces += [(IM_END, assistant), ("\n", False)]
        if add_generation_prompt:
            pieces.append((f"{IM_START}assistant\n", False))
        return pieces

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """HF-style messages → prompt string. List content is byte-identical to the llava-hf interleave
        template; string content is rendered verbatim (module docstring). add_generation_prompt appends
        `<|im_start|>assistant\\n`, where the answer starts."""
        return "".join(text for text, _ in self._render(messages, add_generation_prompt))

    def encode_chat(self, messages, images=None, videos=None, num_frames=None, multi_patch=False,
                    add_generation_prompt=False):
        """A conversation + its media → {"input_ids" (T,), "labels" (T,), "pixel_values" (N,3,S,S) or None}.

        labels hold the token id where a token is supervised (assistant text and each assistant turn's
        closing <|im_end|>) and -100 elsewhere; the whole string is tokenized at once, as transformers does."""
        images, videos = _listify(images), _listify(videos)
        if not messages:
            raise ValueError("empty conversation: no messages")
        pieces = self._render(messages, add_generation_prompt)
        full = "".join(t for t, _ in pieces)
        k = self._num_frames(num_frames)
        self._check_prompts([full], images, videos, k, multi_patch)
        image_iter, video_iter, pixels = iter(images), iter(videos), []
        text, spans = "", []
        for piece, supervised in pieces:
            expanded = self._expand(piece, image_iter, video_iter, k, multi_patch, pixels)
            if supervised:
                spans.append((len(text), len(text) + len(expanded)))
            text += expanded
        enc = self.tokenizer.encode(text)
        self._check_length(len(enc.ids))
        # a token is supervised when its characters overlap a span (transformers' rule for the mask)
        labels = [i if any(s < e1 and e > s1 for s1, e1 in spans) else IGNORE_INDEX
                  for i, (s, e) in zip(enc.ids, enc.offsets)]
        return {"input_ids": torch.tensor(enc.ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": torch.from_numpy(np.stack(pixels)) if pixels else None}

    # ----------------------------------------------------------------------------------- encoding
    def encode(self, text):
        """Plain tokenization (no placeholder expansion) → list of ids."""
        return self.tokenizer.encode(_valid_text(text)).ids

    def image_pixels(self, image):
        """One image (PIL / uint8 array / path) → float32 numpy (3,S,S)."""
        return media.preprocess(media.to_rgb(image), self.image_size, **self.pixel_kwargs)

    def video_frames(self, video, num_frames=None):
        """A video (file path or (T,H,W,3) array) → (PIL frames, frame indices, timestamps in s or None):
        the K frames `__call__` would use for it."""
        return video_to_frames(video, self._num_frames(num_frames))

    def _num_frames(self, num_frames):
        return self.num_frames if num_frames is None else check_num_frames(num_frames)

    def _check_prompts(self, texts, images, videos, k, multi_patch):
        """Everything that can be refused from the numbers alone, before any file is opened or decoded."""
        for t in texts:
            _valid_text(t)
            if not t.strip():
                raise ValueError("empty prompt: no text and no <image>/<video> placeholder")
        n_img = sum(t.count(self.image_token) for t in texts)
        n_vid = sum(t.count(VIDEO_TOKEN) for t in texts)
        for kind, n_ph, given in (("<image>", n_img, len(images)), ("<video>", n_vid, len(videos))):
            if n_ph != given:
                raise ValueError(f"prompt has {n_ph} {kind} placeholder(s) but {given} "
                                 f"{kind.strip('<>')}(s) were given")
        if self.max_length is None:
            return
        # with <video> spelled <image> each placeholder is one id (added tokens split the text first), so text
        # ids + the views' ids is the expanded length: exact, or a lower bound for multi-patch (fewest tiles)
        s, grid = self.image_size, self.grid_pinpoints or [(w * self.image_size, h * self.image_size)
                                                           for w, h in media.DEFAULT_PINPOINTS]
        per_image = 1 + min(-(-w // s) * -(-h // s) for w, h in grid) if multi_patch else 1
        videos = iter(videos)
        for t in texts:
            n_img, n_vid = t.count(self.image_token), t.count(VIDEO_TOKEN)
            frames = sum(_frame_count(next(videos), k) for _ in range(n_vid))
            n = len(self.encode(t.replace(VIDEO_TOKEN, self.image_token))) - n_img - n_vid
            self._check_length(n + (n_img * per_image + frames) * self.tokens_per_image,
                               "at least " if multi_patch and n_img else "")

    def _check_length(self, n, at_least=""):
        if self.max_length is not None and n > self.max_length:
            raise ValueError(f"prompt is {at_least}{n} tokens long (images included) but the model's "
                             f"context is {self.max_length} tokens")

    def _expand(self, text, image_iter, video_iter, num_frames, multi_patch, pixels):
        """Replace each placeholder of `text` by its image tokens, appending the pixels in order."""
        parts = []
        for piece in self._placeholder.split(text):
            if piece == self.image_token:
                img = media.to_rgb(next(image_iter))
                views = media.anyres_tiles(img, self.image_size, self.grid_pinpoints)[0] if multi_patch else [img]
            elif piece == VIDEO_TOKEN:
                views = self.video_frames(next(video_iter), num_frames)[0]
            else:
                parts.append(piece)
                continue
            pixels.extend(media.preprocess(v, self.image_size, **self.pixel_kwargs) for v in views)
            parts.append(self.image_token * (len(views) * self.tokens_per_image))
        return "".join(parts)

    def __call__(self, text, images=None, videos=None, num_frames=None, multi_patch=False):
        """Prompt(s) with `<image>`/`<video>` placeholders + media → input_ids, attention_mask, pixel_values."""
        texts = [text] if isinstance(text, (str, bytes)) else _listify(text)
        if not texts:
            raise ValueError("empty prompt: no text given")
        images, videos = _listify(images), _listify(videos)
        k = self._num_frames(num_frames)
        self._check_prompts(texts, images, videos, k, multi_patch)
        image_iter, video_iter, pixels, seqs = iter(images), iter(videos), [], []
        for t in texts:
            ids = self.tokenizer.encode(self._expand(t, image_iter, video_iter, k, multi_patch, pixels)).ids
            self._check_length(len(ids))
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        pad = self.pad_token_id
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
