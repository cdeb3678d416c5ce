"""Stores: how a global layer holds the entries its selection keeps, and frees the rest.

The third seam, beside the scorer (how important each entry is, :mod:`snapkv_ext.scorers`) and
the budget policy (how many entries each layer and KV head keeps, :mod:`snapkv_ext.policies`).
Any scorer works with any policy and any store that can hold what the policy keeps.

Built in (:data:`STORES`):

- ``dense`` (:class:`snapkv_ext.layers.SnapKVLayer`): one buffer ``[B, H_kv, T, D]`` per layer,
  every KV head at the same length, read by the model's own attention. It holds a uniform
  selection per layer (the ``snapkv`` and ``pyramidkv`` policies); a left-padded row keeps its
  padding.
- ``ragged`` (:class:`snapkv_ext.layers.RaggedSnapKVLayer`): one packed buffer per layer, each
  (row, KV head) its own length, decoded by :func:`snapkv_ext.ops.ragged_attention`. It holds any
  selection, and stores exactly what is kept: no head padded to its layer's longest, no left
  padding. A policy whose heads keep different counts (``per_head = True``: ``adakv``,
  ``ada-pyramidkv``) needs it.

The default store is the one the policy needs: ``ragged`` under a per-head policy, else ``dense``.

A store is a :class:`snapkv_ext.layers.SnapKVLayer` subclass (the layer interface the cache, the
document API and layer-major prefill call) with a class attribute ``per_head``: whether it can hold
each KV head at its own length. A store of one's own is passed as the class
(``SnapKVCache(model, store=MyStore)``); :func:`resolve` checks it.
"""
from __future__ import annotations

import functools
from typing import Dict, Type, Union

from .layers import RaggedSnapKVLayer, SnapKVLayer

__all__ = ["STORES", "resolve", "layer_class", "document_layer_class", "name", "describe"]

STORES: Dict[str, Type[SnapKVLayer]] = {"dense": SnapKVLayer, "ragged": RaggedSnapKVLayer}

Store = Union[str, Type[SnapKVLayer]]


def resolve(store, policy) -> Store:
    """The store for ``policy``: ``store`` itself (a name in :data:`STORES` or a
    :class:`SnapKVLayer` subclass) once checked against the policy, or with ``store=None`` the one
    the policy needs. Refused in one line: an unknown name, anything else than a layer class, a
    store that keeps every head at one length under a per-head policy."""
    if store is None:
        return "ragged" if policy.per_head else "dense"
    if isinstance(store, str):
        if store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)} or a SnapKVLayer subclass, got {store!r}")
    elif not (isinstance(store, type) and issubclass(store, SnapKVLayer)):
        raise ValueError(f"store must be one of {', '.join(STORES)} or a SnapKVLayer subclass, got {store!r}")
    if policy.per_head and not layer_class(store).per_head:
        raise ValueError(f"store {name(store)!r} holds every KV head of a layer at one length, and policy "
                         f"{getattr(policy, 'name', type(policy).__name__)!r} gives each head its own count: "
                         "use store='ragged' (or leave store unset)")
    return store


def layer_class(store: Store) -> Type[SnapKVLayer]:
    """The global layer class of a resolved store."""
    return STORES[store] if isinstance(store, str) else store


def name(store: Store) -> str:
    """A store's name: its key in :data:`STORES`, or the class name of one's own."""
    return store if isinstance(store, str) else store.__name__


def describe(store: Store) -> str:
    """A built-in store's name, what a saved document stores. A store of one's own is refused in
    one line."""
    if not isinstance(store, str):
        raise ValueError(f"store {name(store)} is not a built-in store ({', '.join(STORES)}): "
                         "it cannot be saved with a document")
    return store


@functools.lru_cache(maxsize=None)
def _with_document(store_class: type, document_layer: type) -> type:
    return type(f"Document{store_class.__name__}", (document_layer, store_class),
                {"__doc__": f"{document_layer.__name__} over the {store_class.__name__} store."})


def document_layer_class(store: Store) -> type:
    """The document API's global layer over ``store``: the document's reading
    (:class:`snapkv_ext.document.DocumentLayer`) on the store's holding."""
    from .document import DocumentLayer

    cls = layer_class(store)
    return DocumentLayer if cls is SnapKVLayer else _with_document(cls, DocumentLayer)
