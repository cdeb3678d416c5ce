"""snapkv-ext: SnapKV KV-cache compression with native C++/CUDA kernels.

Importing the package loads the native library, which registers the ops as
``torch.ops.snapkv.*``; the typed wrappers in :mod:`snapkv_ext.ops` are re-exported here.
"""
import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

from . import _C  # noqa: F401  (registers torch.ops.snapkv.*)
from . import ops, reference
from .ops import (
    compact,
    compact_into,
    has_cuda_kernels,
    pool_scores,
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
    "has_cuda_kernels",
    "ops",
    "pool_scores",
    "reference",
    "select_topk",
    "snapkv_compress",
    "snapkv_compress_into",
    "window_scores",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The cache needs transformers; the ops do not. Import it on first use.
    if name in ("SnapKVCache", "SnapKVConfig"):
        from . import cache

        return getattr(cache, name)
    if name == "SnapKVDocument":
        from .document import SnapKVDocument

        return SnapKVDocument
    raise AttributeError(f"module 'snapkv_ext' has no attribute {name!r}")
