"""Tiny random LLaVA-Interleave checkpoints built with transformers, saved in every layout.

The tensors carry the official names and the config.json the official fields, so the real
loading code runs on them; only the sizes are small. Used by the parity tests.
"""

import json
import os

import torch
from safetensors.torch import save_file

from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig


def hf_config(vocab=300, hidden=64, inter=96, layers=2, heads=4, kv_heads=2, tied=True,
              image_size=70, patch=14, v_hidden=48, v_inter=80, v_layers=3, v_heads=4, image_token=299,
              feature_layer=-1, max_pos=4096):
    vc = SiglipVisionConfig(hidden_size=v_hidden, intermediate_size=v_inter, num_hidden_layers=v_layers,
                            num_attention_heads=v_heads, image_size=image_size, patch_size=patch,
                            vision_use_head=False)
    tc = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                     rope_theta=1e6, max_position_embeddings=max_pos, bos_token_id=None, eos_token_id=None)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token,
                       vision_feature_layer=feature_layer, vision_feature_select_strategy="full",
                       tie_word_embeddings=tied)


def hf_model(seed=0, **kw):
    """A seeded random model; post_layernorm and norms get non-trivial weights so that using
    post_layernorm by mistake, or a wrong norm, shows up in the logits."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # layer norms and RMS norms default to ones / zeros
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    return model


def official_config_dict(cfg: LlavaConfig) -> dict:
    """config.json as the hub's llava-hf files write it (transformers 4.4x fields)."""
    v, t = cfg.vision_config, cfg.text_config
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_token_index": cfg.image_token_index, "model_type": "llava", "projector_hidden_act": "gelu",
        "text_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size,
                        "max_position_embeddings": t.max_position_embeddings, "max_window_layers": 21,
                        "model_type": "qwen2", "num_attention_heads": t.num_attention_heads,
                        "num_hidden_layers": t.num_hidden_layers, "num_key_value_heads": t.num_key_value_heads,
                        "rope_theta": t.rope_parameters["rope_theta"], "sliding_window": 32768,
                        "use_sliding_window": False, "tie_word_embeddings": t.tie_word_embeddings,
                        "torch_dtype": "bfloat16", "vocab_size": t.vocab_size},
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
        "vision_config": {"hidden_act": "gelu_pytorch_tanh", "hidden_size": v.hidden_size,
                          "image_size": v.image_size, "intermediate_size": v.intermediate_size,
                          "layer_norm_eps": 1e-06, "model_type": "siglip_vision_model",
                          "num_attention_heads": v.num_attention_heads, "num_hidden_layers": v.num_hidden_layers,
                          "patch_size": v.patch_size, "vision_use_head": False},
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
    }


def _renamed(model, layout):
    """The model's tensors under the names of `layout` (a dict of contiguous tensors)."""
    tied = model.config.tie_word_embeddings
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if tied:
                continue
            name = {"lmms-lab": "lm_head.weight"}.get(layout, "language_model.lm_head.weight")
        elif name.startswith("model.language_model."):
            rest = name[len("model.language_model."):]
            name = ("model." if layout == "lmms-lab" else "language_model.model.") + rest
        elif name.startswith("model.vision_tower."):
            rest = name[len("model.vision_tower."):]
            name = {"llava-hf": "vision_tower.vision_model.", "hf5": "vision_tower.",
                    "lmms-lab": "model.vision_tower.vision_tower.vision_model."}[layout] + rest
        elif name.startswith("model.multi_modal_projector."):
            rest = name[len("model.multi_modal_projector."):]
            if layout == "lmms-lab":
                rest = rest.replace("linear_1", "0").replace("linear_2", "2")
                name = "model.mm_projector." + rest
            else:
                name = "multi_modal_projector." + rest
        out[name] = t.detach().clone().contiguous()
    return out


def save_checkpoint(model, path, layout="llava-hf", shards=1, dtype=None):
    """Write `model` to `path` in `layout` ("llava-hf", "hf5" or "lmms-lab"), in `shards` files."""
    os.makedirs(path, exist_ok=True)
    if layout == "hf5":
        model.save_pretrained(path)  # transformers' own writer
        return path
    tensors = _renamed(model, layout)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    cfg = model.config
    if layout == "lmms-lab":
        tensors["model.image_newline"] = torch.randn(cfg.text_config.hidden_size)
        t = cfg.text_config
        tower = {"model_type": "siglip_vision_model", **{k: getattr(cfg.vision_config, k) for k in (
            "hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")},
            # the original code deletes the tower's last layer: a 27-layer tower serves 26 layers
            "num_hidden_layers": cfg.vision_config.num_hidden_layers + 1}
        os.makedirs(os.path.join(path, "siglip_tower"), exist_ok=True)
        with open(os.path.join(path, "siglip_tower", "config.json"), "w") as f:
            json.dump(tower, f)
        conf = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen",
                "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": 1e-6,
                "rope_theta": t.rope_parameters["rope_theta"], "vocab_size": t.vocab_size,
                "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
                "image_aspect_ratio": "anyres", "mm_hidden_size": cfg.vision_config.hidden_size,
                "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                "mm_vision_tower": "siglip_tower", "use_sliding_window": False,
                "image_token_index": cfg.image_token_index}
    else:
        conf = official_config_dict(cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path
