"""PEFT's adapter file format, as lora.py reads and writes it: names, adapter_config.json, key mapping.

What PEFT's `save_pretrained` writes for transformers' LlavaForConditionalGeneration (checked against peft 0.21
and transformers 5.24 by tests/test_lora.py; PEFT: peft/utils/save_and_load.py, peft/tuners/lora/config.py):
    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in), ...lora_B.weight (out, r)
<module> is the module's path in transformers 5 (PART_PREFIX); files of the transformers 4 era
(LEGACY_PREFIX) load too. What a config asks that lora.py does not do is refused, naming the field.
"""

import json
import os
import re

# the transformers 5 module path of each part's layers
PART_PREFIX = {"decoder": "model.language_model.layers.", "vision": "model.vision_tower.encoder.layers."}
# the same layers under transformers 4 (the hub's llava-hf files and the adapters trained on them)
LEGACY_PREFIX = {"decoder": "language_model.model.layers.", "vision": "vision_tower.vision_model.encoder.layers."}
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
PROJECTOR = "multi_modal_projector"  # PEFT's modules_to_save name of the projector (transformers 4 and 5 alike)
PROJECTOR_KEYS = {f"{KEY_PREFIX}{prefix}{PROJECTOR}.{lin}.{wb}": f"projector.{lin}.{wb}"
                  for prefix in ("model.", "") for lin in ("linear_1", "linear_2") for wb in ("weight", "bias")}
# transformers modules an adapter could target that are not adapted here
NOT_ADAPTED = ("lm_head", "model.language_model.embed_tokens", "model.multi_modal_projector.linear_1",
               "model.multi_modal_projector.linear_2", "model.vision_tower.embeddings.patch_embedding",
               "model.vision_tower.embeddings.position_embedding")


def peft_config(c, base_model_name_or_path=None):
    """adapter_config.json as a dict: PEFT's field names and values. The fields every PEFT version since 0.9
    knows (DoRA's arrival); a loader fills the rest with its defaults, and older versions refuse fields they
    do not know, so the newer ones are left out. No task_type: PEFT then records the base class, as here.
    c: the settings of lora.add_lora / load_adapter (`model.lora_config`)."""
    return {"peft_type": "LORA", "task_type": None,
            "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                             "parent_library": "transformers.models.llava.modeling_llava"},
            "base_model_name_or_path": base_model_name_or_path or c.get("base_model_name_or_path"),
            "revision": None, "inference_mode": True, "r": c["r"], "lora_alpha": c["lora_alpha"],
            "lora_dropout": c["lora_dropout"], "use_rslora": c["use_rslora"], "target_modules": c["target_modules"],
            "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": c.get("modules_to_save"),
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}}


def read_adapter_config(path):
    """(adapter_config.json as a dict, its path, the adapter_model.safetensors path) of the adapter folder or hub
    id `path`; a one-line error for a missing file or invalid JSON (a pickled adapter_model.bin is never read)."""
    from . import hub
    path = hub.resolve(path)
    cfg_file, file = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
    if not os.path.isfile(file):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors" + (
            " (adapter_model.bin is pickled and never loaded here)" if pickled else ""))
    with open(cfg_file, encoding="utf-8") as f:
        try:
            return json.load(f), cfg_file, file
        except ValueError as e:
            raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None


# adapter_config.json fields: read; ignored (how the adapter was made, or runtime settings of PEFT); every
# other field, known or not, must be empty (None, False, "none", [] or {}) or the adapter is refused.
READ = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
        "exclude_modules", "init_lora_weights", "base_model_name_or_path", "modules_to_save")
IGNORED = ("revision", "inference_mode", "auto_mapping", "peft_version", "loftq_config", "eva_config",
           "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
           "runtime_config", "layers_pattern")
# initialisations that leave the base weights as they are (the others subtract the initial B A from them, so
# the adapter needs a base the file does not hold)
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def check_config(c, file):
    """The LoRA settings of an adapter_config.json dict; a ValueError naming the first unsupported field."""
    def refuse(field, why=""):
        raise ValueError(f"{file}: {field} = {json.dumps(c.get(field))} is not supported{why}")
    if c.get("peft_type") != "LORA":
        refuse("peft_type", " (only LORA adapters)")
    if c.get("task_type") not in (None, "CAUSAL_LM"):
        refuse("task_type", " (None or CAUSAL_LM)")
    if c.get("init_lora_weights", True) not in PLAIN_INITS:
        refuse("init_lora_weights", ": the adapter needs the modified base it was made with (PEFT converts it "
                                    "with save_pretrained(path_initial_model_for_weight_conversion=...))")
    if not isinstance(c.get("target_modules"), (str, list)):
        refuse("target_modules", " (a list of module names or a regex)")
    if c.get("modules_to_save") not in (None, [], [PROJECTOR]):
        refuse("modules_to_save", f" (only [\"{PROJECTOR}\"]: the projector, trained fully)")
    if isinstance(c["target_modules"], str) and c["target_modules"].lower() == "all-linear":
        refuse("target_modules", " (all-linear includes the projector; list the projections)")
    for field, value in c.items():
        if field not in READ and field not in IGNORED and value not in (None, False, "none", [], {}):
            refuse(field)
    r, alpha, dropout = c.get("r", 8), c.get("lora_alpha", 8), c.get("lora_dropout", 0.0)
    return r, alpha, dropout, bool(c.get("use_rslora", False))


def module_of_key(key, file):
    """base_model.model.<module>.lora_{A,B}.weight -> (<module> as transformers 5 names it, "lora_A"/"lora_B")."""
    m = re.fullmatch(re.escape(KEY_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
    if m is None:
        raise ValueError(f"{file}: tensor {key} is not a LoRA weight (base_model.model.<module>.lora_A.weight or "
                         f"lora_B.weight)")
    name = m.group(1)
    for part, old in LEGACY_PREFIX.items():
        if name.startswith(old):
            name = PART_PREFIX[part] + name[len(old):]
    return name, m.group(2)


def legacy_name(name):
    for part, prefix in PART_PREFIX.items():
        if name.startswith(prefix):
            return LEGACY_PREFIX[part] + name[len(prefix):]
    return name
