"""The public Python API: ``dlm.from_pretrained(path)`` and the model object it returns.

The loader is ``dlm/models/loader.py``; this module only names it for users.
"""

from __future__ import annotations

from dlm.models.loader import DiffusionLM, load as from_pretrained
from dlm.sample.engine import Output as GenerateOutput  # .sequences, .nfe, .committed_at, .texts

__all__ = ["DiffusionLM", "GenerateOutput", "from_pretrained"]
