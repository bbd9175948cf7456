"""The small byte-level BPE tokenizer + processor files of a tiny llava-interleave checkpoint.

`write_tokenizer_files(dir, ...)` trains a small byte-level BPE `tokenizer.json` (deterministic: same
arguments → same bytes) and writes every non-weight file a llava-interleave checkpoint directory holds:

    tokenizer.json  tokenizer_config.json  special_tokens_map.json  added_tokens.json
    chat_template.json  preprocessor_config.json  processor_config.json  generation_config.json

The pipeline is Qwen2's (NFC normalizer, Qwen split regex + ByteLevel pre-tokenizer, ByteLevel decoder,
no BOS), the special tokens are Qwen's plus `<image>`, appended after the BPE vocabulary in Qwen's order
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<image>`), and the chat template is the llava-hf
interleave one. transformers' `AutoProcessor.from_pretrained(dir)` loads the result offline
(tests/test_processor.py checks it). config.json and the safetensors are written by the caller.
train.py uses it for the bundled checkpoint (weights/minterleave-tiny), with the synthetic tasks'
questions and answers as `extra_corpus`; the tests use it for their tiny checkpoints.
"""

import json
import os

from .config import tokens_per_image

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")

# Qwen2's pre-tokenizer regex (transformers models/qwen2/tokenization_qwen2.py).
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# The llava-hf/llava-interleave-qwen-*-hf chat template, written into chat_template.json so that
# transformers renders the checkpoint's conversations as the hub files do (images of a turn first, then
# "\n" + each text; no system prompt); `{% generation %}` marks assistant text for
# return_assistant_tokens_mask. minterleave itself renders with Processor._render (tests check the two
# agree). Written with indent=2 this file is 699 bytes, the size of the hub's chat_template.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is shown in this image? The image shows two cats lying on a pink blanket.
What are these? These are two images of the same street at different times of the day.
What is the difference between these two images? In the first image the car is red, in the second it is blue.
Which image has a green triangle? The second image has a green triangle in the top left corner.
How many objects are there in total across the images? There are three objects in the first image and two in the second.
Describe the video. A small red ball moves from the left to the right of the frame.
Which object appears in the last frame? A yellow square appears in the last frame.
In which direction does the circle move? The circle moves up, then down, then to the left.
What happened first? First the blue cube fell, then the green sphere rolled away.
The scene is seen from several views. How many cubes are hidden behind the wall? One cube is hidden.
What colour is the object at the center of the table? The object at the center is orange.
Is the purple cylinder to the left or to the right of the white cone? It is to the left.
Read the small text in the corner of the large image. The text says seven.
Answer with a single word. Yes. No. Left. Right. Up. Down. Red. Green. Blue. Yellow. Black. White.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 12 24 100 2024.
user assistant system: You are a helpful assistant. Please answer the question about the pictures.
The weather today is sunny with a light breeze, and the park is full of people walking their dogs.
She said: "I don't think it's going to rain." He replied: 'We'll see, won't we?'
Numbers like 3.14, 42, and 1,000,000 appear in text; so do symbols such as (a), [b], {c}, #d, @e, and 50%.
    Indented lines, tabs\tand trailing spaces   are part of real text too.
"""

_NON_ASCII = """\
A café in the naïve façade served crème brûlée; the señor paid 5 € for a piña colada.
日本の東京で写真を撮りました。这是一只猫。 한국어 문장도 있습니다.
Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم.
Emoji: 🙂 😀 🐱 🐶 🚗 🌍 ✨ 👍🏽 and ümlauts ÄÖÜäöüß.
"""

BUILTIN_CORPUS = (_ENGLISH * 3 + _NON_ASCII * 2).splitlines()


def build_tokenizer(vocab_size=512, extra_corpus=()):
    """Train the byte-level BPE; returns a `tokenizers.Tokenizer` with the 4 special tokens appended."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(BUILTIN_CORPUS) + list(extra_corpus), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _added(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_tokenizer_files(directory, vocab_size=512, image_size=28, patch_size=14, num_frames=None,
                          extra_corpus=(), model_max_length=32768):
    """Write the tokenizer/processor files of a tiny llava-interleave checkpoint into `directory`.

    vocab_size: target size including the 4 special tokens (the trainer may stop earlier on a small
      corpus; the real size is returned). image_size: the SigLIP input S (preprocessor `size`).
    patch_size: the vision patch (processor_config), so an image costs (S // patch)^2 tokens.
    num_frames: if given, written as `num_frames` in preprocessor_config.json (default video frames).
    extra_corpus: more training lines (e.g. the synthetic tasks' text for the bundled model).

    Returns {"vocab_size", "image_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
    "im_start_id", "tokens_per_image"} for writing config.json.
    """
    os.makedirs(directory, exist_ok=True)
    tok = build_tokenizer(vocab_size, extra_corpus)
    tok.save(os.path.join(directory, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): _added(t) for t in SPECIAL_TOKENS},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "processor_class": "LlavaProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"), {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": {k: v for k, v in _added("<|im_end|>").items() if k != "special"},
        "pad_token": {k: v for k, v in _added("<|endoftext|>").items() if k != "special"},
    })
    _write_json(os.path.join(directory, "added_tokens.json"), {t: ids[t] for t in sorted(SPECIAL_TOKENS)})
    with open(os.path.join(directory, "chat_template.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)
    preprocessor = {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    }
    if num_frames is not None:
        preprocessor["num_frames"] = int(num_frames)
    _write_json(os.path.join(directory, "preprocessor_config.json"), preprocessor)
    _write_json(os.path.join(directory, "processor_config.json"), {
        "image_token": "<image>", "num_additional_image_tokens": 0, "patch_size": patch_size,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "full",
    })
    _write_json(os.path.join(directory, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    })
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "image_token_id": ids["<image>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "im_start_id": ids["<|im_start|>"],
        "tokens_per_image": tokens_per_image(image_size, patch_size),
    }
