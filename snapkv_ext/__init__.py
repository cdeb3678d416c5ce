"""snapkv-ext: SnapKV KV-cache compression with native C++/CUDA kernels.

Importing the package loads the native library, which registers the ops as
``torch.ops.snapkv.*``; the typed wrappers in :mod:`snapkv_ext.ops` are re-exported here.

The library: ops, reference (float64 oracle of every op), config (SnapKVConfig), adapters (model
families), layers (per-layer storage), cache (SnapKVCache), document (SnapKVDocument). The
command line, evaluations and model loaders are in :mod:`snapkv_ext.tools`.
"""
import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

from . import _C  # noqa: F401  (registers torch.ops.snapkv.*)
from . import cpu, ops, reference
from .cpu import cpu_info, cpu_isa, cpu_isas, forced_cpu_isa, set_cpu_isa
from .config import SnapKVConfig
from .ops import (
    compact,
    compact_into,
    has_cuda_kernels,
    pool_scores,
    ragged_attention,
    select_topk,
    snapkv_compress,
    snapkv_compress_into,
    window_scores,
)

__all__ = [
    "SnapKVCache",
    "SnapKVConfig",
    "SnapKVDocument",
    "compact",
    "compact_into",
    "cpu_info",
    "cpu_isa",
    "cpu_isas",
    "forced_cpu_isa",
    "has_cuda_kernels",
    "ops",
    "pool_scores",
    "ragged_attention",
    "reference",
    "select_topk",
    "set_cpu_isa",
    "snapkv_compress",
    "snapkv_compress_into",
    "window_scores",
]
__version__ = "0.1.0"

cpu._apply_env()


def __getattr__(name):
    # The cache needs transformers; the ops do not. Import it on first use.
    if name == "SnapKVCache":
        from .cache import SnapKVCache

        return SnapKVCache
    if name == "SnapKVDocument":
        from .document import SnapKVDocument

        return SnapKVDocument
    raise AttributeError(f"module 'snapkv_ext' has no attribute {name!r}")
