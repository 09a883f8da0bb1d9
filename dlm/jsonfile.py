"""JSON files from elsewhere (workdir and model-folder configs): one reader, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from dlm.errors import UserError


def read_object(path: str | os.PathLike, *, fix: str, max_bytes: int | None = None) -> dict[str, Any]:
  """The JSON object in ``path``; a file that is too large, not UTF-8, not JSON or not an
  object is one ``UserError`` naming the file, ending in ``fix``."""
  path = pathlib.Path(path)
  if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
    raise UserError(f"{path} is {size} bytes, over the {max_bytes} limit of this file; {fix}")
  raw = path.read_bytes()
  try:
    data = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start});"
                    f" {fix}") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not JSON ({e.msg} at line {e.lineno}); {fix}") from None
  except ValueError as e:  # e.g. an integer of too many digits
    raise UserError(f"{path} is not readable JSON ({str(e)[:120]}); {fix}") from None
  if not isinstance(data, dict):
    raise UserError(f"{path} is a JSON {type(data).__name__}, not an object; {fix}")
  return data
