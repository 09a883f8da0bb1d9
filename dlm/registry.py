"""Name -> function registries, so a researcher extends dlm from a config.

A config names an entry either by its registered name (``"masked"``) or by an
import path to any module-level object (``"my_pkg.my_losses:my_elbo"``); the
second form needs no change to dlm at all.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named table of callables with import-path fallback."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
      if name in self._entries and self._entries[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = obj
      return obj

    return deco

  def names(self) -> list[str]:
    return sorted(self._entries)

  def get(self, name: str) -> T:
    if name in self._entries:
      return self._entries[name]
    if ":" in name:
      module_name, _, attr = name.partition(":")
      try:
        module = importlib.import_module(module_name)
      except ImportError as e:
        raise ValueError(
            f"{self.kind} {name!r}: cannot import module {module_name!r} ({e});"
            " put it on PYTHONPATH or fix the name") from None
      try:
        return getattr(module, attr)
      except AttributeError:
        raise ValueError(
            f"{self.kind} {name!r}: module {module_name!r} has no {attr!r}") from None
    raise ValueError(
        f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
        " (or give 'module.path:function')")

  def __contains__(self, name: str) -> bool:
    return name in self._entries
