"""minterleave: LLaVA-NeXT-Interleave in plain PyTorch.

    import minterleave as mi
    model = mi.Model.from_pretrained(path)
    proc = mi.Processor.from_pretrained(path)
"""

from .attention import set_backend, use_backend
from .config import ModelConfig, TextConfig, VisionConfig, load_config
from .model import Model
from .processor import Processor

__all__ = ["Model", "Processor", "ModelConfig", "TextConfig", "VisionConfig", "load_config",
           "set_backend", "use_backend"]
