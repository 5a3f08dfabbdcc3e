"""dga-hf: Dynamic Group Attention for Hugging Face Transformers.

    import dga_hf
    dga_hf.patch(model)              # shipped default settings
    dga_hf.unpatch(model)            # back to the exact original
"""

from .config import DGAConfig, preset_names
from .ops import dga_attention, naive_dga_attention

__all__ = ["DGAConfig", "dga_attention", "naive_dga_attention", "preset_names"]
__version__ = "0.1.0"
