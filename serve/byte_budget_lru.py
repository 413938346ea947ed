"""An LRU mapping bounded by the bytes of its values: the encoder's cache of image-token
embeddings, the preprocess stage's cache of preprocessed images and the ingress's cache of
compiled grammars."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteBudgetLru(Generic[V]):
    """Values by key, least recently used evicted first, their sizes (`size_of`) within `max_bytes`.

    A value larger than the whole budget is not kept; a budget of 0 keeps nothing."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size_of = size_of
        self._entries: OrderedDict[str, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._entries)

    def get(self, key: str) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        size = self._size_of(value)
        if size > self.max_bytes or key in self._entries:
            return
        while self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= self._size_of(evicted)
        self._entries[key] = value
        self.bytes += size
