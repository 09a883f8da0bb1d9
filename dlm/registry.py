"""Name -> function registries, so a researcher extends dlm from a config.

A config names an entry either by its registered name (``"masked"``) or by an
import path to any module-level object (``"my_pkg.my_losses:my_elbo"``); the
second form needs no change to dlm at all.

Only what the user passes in this command (a recipe file, ``--config.*``, Python
arguments) may name an import path.  A config read from a workdir, checkpoint or
model folder is data: ``check_untrusted`` refuses every import path in it unless
the user passes ``--trust_config_code`` (``trust_config_code=True`` in Python).
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Generic, Iterator, TypeVar

from dlm.errors import UserError

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


# "pkg.mod:attr" (dotted identifiers on both sides): the form Registry.get imports.
IMPORT_PATH = re.compile(r"\s*[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\s*:\s*[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\s*")
TRUST_HINT = ("only registered names load from files; if you trust this file, pass"
              " --trust_config_code (trust_config_code=True in Python)")


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _strings(v, f"{path}.{k}" if path else str(k))
  elif isinstance(node, (list, tuple)):
    for i, v in enumerate(node):
      yield from _strings(v, f"{path}[{i}]")
  elif isinstance(node, str):
    yield path, node


def import_paths(config: Any) -> list[tuple[str, str]]:
  """(field, value) of every string in ``config`` that names a ``module:attr`` import."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return [(k, v) for k, v in _strings(config, "") if IMPORT_PATH.fullmatch(v)]


def check_untrusted(config: Any, source: str, *, trust: bool = False) -> None:
  """Refuses a loaded config (read from ``source``) that asks to import code, unless ``trust``."""
  if trust:
    return
  found = import_paths(config)
  if found:
    field, value = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise UserError(f"{source} asks to import {value!r} at {field}{more}; refused: {TRUST_HINT}")
