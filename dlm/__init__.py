"""dlm: diffusion language models in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
  """``dlm.from_pretrained`` without importing JAX on ``import dlm``."""
  if name == "from_pretrained":
    from dlm.api import from_pretrained
    return from_pretrained
  raise AttributeError(f"module 'dlm' has no attribute {name!r}")
