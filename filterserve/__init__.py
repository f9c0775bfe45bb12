"""filterserve: export, serve and benchmark LoRA-distilled Qwen2.5 scoring filters.

The bare package (this namespace, ``filterserve.client``) must stay importable without
torch or transformers, so nothing heavy is imported here.
"""

from filterserve.errors import FilterServeError
from filterserve.filter_loader import load_filter
from filterserve.filters import FilterSpec

__all__ = ["FilterServeError", "FilterSpec", "load_filter"]
__version__ = "0.1.0"
