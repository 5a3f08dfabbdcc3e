"""dga-hf: Dynamic Group Attention for Hugging Face Transformers.

    import dga_hf
    dga_hf.patch(model)                                   # shipped default settings
    dga_hf.patch(model, dga_hf.DGAConfig(local_blocks=8))  # explicit settings
    dga_hf.unpatch(model)                                 # back to the exact original
    dga_hf.enable_decoding(model)                         # opt-in: generate() decodes with a DGACache
    dga_hf.enable_decoding(model, dga_hf.DecodingConfig(mode="compact"))
    AutoModelForCausalLM.from_pretrained(path, attn_implementation="dga")
"""

from .config import DecodingConfig, DGAConfig, preset_names
from .decoding import DGACache, disable_decoding, enable_decoding
from .integration import check_supported, is_patched, patch, register, unpatch
from .ops import dense_attention, dga_attention, naive_dga_attention

register()

__all__ = [
    "DGACache",
    "DGAConfig",
    "DecodingConfig",
    "check_supported",
    "dense_attention",
    "dga_attention",
    "disable_decoding",
    "enable_decoding",
    "is_patched",
    "naive_dga_attention",
    "patch",
    "preset_names",
    "unpatch",
]
__version__ = "0.1.0"
