"""Model configuration: what a checkpoint's config.json says the model is.

Two config.json dialects describe the same architecture:
- the llava-hf one (`"model_type": "llava"`, with `vision_config` and `text_config`), written
  by transformers' converter and by `save_pretrained` (4.x and 5.x);
- the original lmms-lab one (`"model_type": "llava_qwen"`): Qwen2 fields at the top level and
  `mm_vision_tower` naming the SigLIP tower, whose dimensions are not in the file.

Fields that a config.json leaves out take the defaults transformers gives them (Qwen2Config,
SiglipVisionConfig, LlavaConfig), so a file means the same model here as there.
The facts the rest of the code reads from here, derived once: `tokens_per_image` (what one image costs
in the sequence), `special_tokens` (the ids that end generation and pad a batch), `DEFAULT_NUM_FRAMES`
and `IGNORE_INDEX`. docs/checkpoint-layouts.md describes both dialects field by field.
"""

import json
import os
from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label of a token that is not supervised (transformers' and PyTorch's convention)
DEFAULT_NUM_FRAMES = 16  # frames sampled from a video when neither the call nor the checkpoint says


def read_json(file):
    """The parsed JSON file, or None when it does not exist."""
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read JSON ({e})") from None


def tokens_per_image(image_size, patch_size, num_additional_image_tokens=0, feature_select="full"):
    """Sequence positions one image fills: its (S // patch)^2 patches, plus any extra slots the tower
    emits (a CLS token: `num_additional_image_tokens`), minus one when the "default" feature strategy
    drops the first slot. transformers' LlavaProcessor counts the same way; 729 for the official models."""
    n = (image_size // patch_size) ** 2 + int(num_additional_image_tokens)
    return n - 1 if feature_select == "default" else n


def special_tokens(path):
    """{"eos": [ids that end generation], "pad": padding id or None} of a checkpoint folder:
    generation_config.json's eos_token_id, else tokenizer_config.json's (or special_tokens_map.json's)
    eos_token; the pad token from the same two files. Token strings are looked up among tokenizer.json's
    added tokens. Model (generate's default stop) and Processor both read this."""
    gen = read_json(os.path.join(path, "generation_config.json")) or {}
    tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
    smap = read_json(os.path.join(path, "special_tokens_map.json")) or {}
    added = None

    def token_id(name):
        nonlocal added
        tok = tok_cfg.get(name) or smap.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if not tok:
            return None
        if added is None:
            tj = read_json(os.path.join(path, "tokenizer.json")) or {}
            added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        return added.get(tok)

    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos and token_id("eos_token") is not None:
        eos = [token_id("eos_token")]
    return {"eos": [int(i) for i in eos], "pad": token_id("pad_token")}


@dataclass
class VisionConfig:
    """SigLIP ViT. Defaults are transformers' SiglipVisionConfig defaults."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """Qwen2 decoder. Defaults are transformers' Qwen2Config defaults (= Qwen1.5-7B)."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151646
    # which hidden state of the ViT is the image feature: hidden_states[feature_layer] with
    # hidden_states[0] the embeddings, so -1 = output of the last layer (before post_layernorm)
    feature_layer: int = -1
    # "full" keeps every patch; "default" drops the first one (the CLS slot of CLIP towers)
    feature_select: str = "full"
    layout: str = "llava-hf"  # or "lmms-lab": decides the tensor names in weights.py

    @property
    def tokens_per_image(self) -> int:
        # SigLIP emits one feature per patch and no CLS slot
        return tokens_per_image(self.vision.image_size, self.vision.patch_size, 0, self.feature_select)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers that must run to produce hidden_states[feature_layer]."""
        n = self.vision.num_layers
        return n + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer


# The towers an lmms-lab config.json can name. Their dimensions are not in the file; the
# original code builds SigLIP so400m and deletes its last layer (27 -> 26), so we do the same.
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
        image_size=384, patch_size=14, layer_norm_eps=1e-6),
}


class ConfigError(ValueError):
    pass


def _check(cond: bool, path: str, msg: str):
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def _vision_from_dict(d: dict, path: str) -> VisionConfig:
    _check(d.get("model_type", "siglip_vision_model") in ("siglip_vision_model", "siglip"), path,
           f"vision tower is {d.get('model_type')!r}; only SigLIP (siglip_vision_model) is supported")
    _check(d.get("hidden_act", "gelu_pytorch_tanh") == "gelu_pytorch_tanh", path,
           f"vision hidden_act {d.get('hidden_act')!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
    default = VisionConfig()
    return VisionConfig(
        hidden_size=d.get("hidden_size", default.hidden_size),
        intermediate_size=d.get("intermediate_size", default.intermediate_size),
        num_layers=d.get("num_hidden_layers", default.num_layers),
        num_heads=d.get("num_attention_heads", default.num_heads),
        num_channels=d.get("num_channels", default.num_channels),
        image_size=d.get("image_size", default.image_size),
        patch_size=d.get("patch_size", default.patch_size),
        layer_norm_eps=d.get("layer_norm_eps", default.layer_norm_eps),
    )


def _text_from_dict(d: dict, path: str) -> TextConfig:
    _check(d.get("model_type") in ("qwen2", "llava_qwen"), path,
           f"text model is {d.get('model_type')!r}; only Qwen2 (model_type 'qwen2') is supported")
    _check(d.get("hidden_act", "silu") == "silu", path, f"text hidden_act {d.get('hidden_act')!r} is not supported")
    _check(not d.get("use_sliding_window", False), path, "sliding-window attention is not supported")
    rope = d.get("rope_parameters") or {}
    _check(rope.get("rope_type", "default") == "default" and not d.get("rope_scaling"), path,
           f"only plain RoPE is supported, got {rope or d.get('rope_scaling')}")
    default = TextConfig()
    heads = d.get("num_attention_heads", default.num_heads)
    return TextConfig(
        vocab_size=d.get("vocab_size", default.vocab_size),
        hidden_size=d.get("hidden_size", default.hidden_size),
        intermediate_size=d.get("intermediate_size", default.intermediate_size),
        num_layers=d.get("num_hidden_layers", default.num_layers),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or 0,
        rms_norm_eps=d.get("rms_norm_eps", default.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", default.rope_theta))),
        max_position_embeddings=d.get("max_position_embeddings", default.max_position_embeddings),
        tie_word_embeddings=d.get("tie_word_embeddings", default.tie_word_embeddings),
    )


def _from_llava_hf(d: dict, path: str) -> ModelConfig:
    _check("text_config" in d and "vision_config" in d, path, "a llava config needs text_config and vision_config")
    vision = _vision_from_dict(d["vision_config"], path)
    text = _text_from_dict(d["text_config"], path)
    # LlavaConfig copies tie_word_embeddings from text_config when the top level says False
    text.tie_word_embeddings = bool(d.get("tie_word_embeddings", False) or text.tie_word_embeddings)
    _check(d.get("projector_hidden_act", "gelu") == "gelu", path,
           f"projector_hidden_act {d.get('projector_hidden_act')!r} is not supported (only gelu)")
    _check(d.get("multimodal_projector_bias", True), path, "a projector without bias is not supported")
    layer = d.get("vision_feature_layer", -2)
    _check(isinstance(layer, int), path, f"vision_feature_layer {layer!r}: only a single layer index is supported")
    select = d.get("vision_feature_select_strategy", "default")
    _check(select in ("full", "default"), path, f"vision_feature_select_strategy {select!r} is not supported")
    return ModelConfig(vision=vision, text=text, image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
                       feature_layer=layer, feature_select=select, layout="llava-hf")


def _from_lmms_lab(d: dict, path: str, root: str) -> ModelConfig:
    tower = d.get("mm_vision_tower", "")
    if tower in KNOWN_VISION_TOWERS:
        base = KNOWN_VISION_TOWERS[tower]
        vision = VisionConfig(**base.__dict__)
    elif tower and os.path.isfile(os.path.join(root, tower, "config.json")):
        # a tower stored beside the checkpoint (how the original code reads a local tower)
        with open(os.path.join(root, tower, "config.json")) as f:
            td = json.load(f)
        vision = _vision_from_dict(td.get("vision_config", td), os.path.join(root, tower, "config.json"))
    else:
        raise ConfigError(f"{path}: mm_vision_tower {tower!r} is not a known tower "
                          f"({', '.join(KNOWN_VISION_TOWERS)}) nor a folder with a config.json")
    # the original SigLIP tower deletes its last encoder layer and uses the output of the new last one
    vision.num_layers -= 1
    _check(d.get("mm_projector_type", "mlp2x_gelu") == "mlp2x_gelu", path,
           f"mm_projector_type {d.get('mm_projector_type')!r} is not supported (only mlp2x_gelu)")
    _check(d.get("mm_hidden_size", vision.hidden_size) == vision.hidden_size, path,
           f"mm_hidden_size {d.get('mm_hidden_size')} != vision hidden size {vision.hidden_size}")
    text = _text_from_dict(d, path)
    return ModelConfig(vision=vision, text=text, image_token_id=d.get("image_token_index", 151646),
                       feature_layer=-1, feature_select="full", layout="lmms-lab")


def load_config(path: str) -> ModelConfig:
    """Read `path/config.json` (path may also be the file itself)."""
    root = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no config.json (a checkpoint folder holds config.json and *.safetensors)")
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: cannot read config.json ({e})") from None
    kind = d.get("model_type")
    if kind == "llava":
        return _from_llava_hf(d, file)
    if kind == "llava_qwen" or "mm_vision_tower" in d:
        return _from_lmms_lab(d, file, root)
    raise ConfigError(f"{file}: model_type {kind!r} is not supported; expected 'llava' (llava-hf layout, "
                      "SigLIP + Qwen2) or 'llava_qwen' (lmms-lab layout)")


def to_llava_hf_dict(cfg: ModelConfig) -> dict:
    """The llava-hf config.json for `cfg` (used when saving checkpoints)."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": cfg.image_token_id, "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.feature_layer, "vision_feature_select_strategy": cfg.feature_select,
        "tie_word_embeddings": t.tie_word_embeddings, "ignore_index": -100,
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps},
        "text_config": {
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings, "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings},
    }


# Architectures for training from scratch (train.py --preset; --init takes a checkpoint's own instead), as
# nanoGPT's model.py lists the GPT-2 sizes. vocab is the target size of the byte-level BPE trained with them.
PRESETS = {
    # the bundled model. The synthetic tasks draw 64 px images (multi-patch: 128 px, tiled into 64 px
    # quadrants); the processor resizes them to 96 px and the tower cuts 32 px patches, so an image is
    # 3 x 3 = 9 tokens and each multi-image grid cell falls in exactly one patch. ~2.1M parameters.
    "tiny": dict(image_size=96, patch_size=32, v_hidden=128, v_inter=384, v_layers=4, v_heads=4,
                 hidden=128, inter=384, layers=4, heads=4, kv_heads=2, vocab=1000, rope_theta=10000.0,
                 max_pos=2048, num_frames=4, pos_scale=0.5),
    # a toy for tests: same image pipeline, one narrow layer each, trains in seconds
    "test": dict(image_size=96, patch_size=32, v_hidden=32, v_inter=64, v_layers=1, v_heads=2,
                 hidden=48, inter=96, layers=1, heads=4, kv_heads=2, vocab=600, rope_theta=10000.0,
                 max_pos=2048, num_frames=4, pos_scale=0.5),
}


def preset(name, overrides=""):
    """PRESETS[name] with "k=v,..." overrides (train.py --set); ValueError naming an unknown field."""
    p = dict(PRESETS[name])
    for kv in filter(None, overrides.split(",")):
        k, _, v = kv.partition("=")
        if k not in p:
            raise ValueError(f"--set: unknown preset field {k!r} (fields: {', '.join(p)})")
        p[k] = type(p[k])(float(v)) if isinstance(p[k], int) else type(p[k])(v)
    return p


def preset_config(p, vocab_size, image_token_id):
    """The ModelConfig of a preset dict, for a tokenizer of vocab_size with this image token (tied head)."""
    vision = VisionConfig(hidden_size=p["v_hidden"], intermediate_size=p["v_inter"], num_layers=p["v_layers"],
                          num_heads=p["v_heads"], image_size=p["image_size"], patch_size=p["patch_size"])
    text = TextConfig(vocab_size=vocab_size, hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_layers=p["layers"], num_heads=p["heads"], num_kv_heads=p["kv_heads"],
                      rope_theta=p["rope_theta"], max_position_embeddings=p["max_pos"], tie_word_embeddings=True)
    return ModelConfig(vision=vision, text=text, image_token_id=image_token_id)
