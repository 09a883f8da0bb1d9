"""JAX's persistent compilation cache, on by default for `dlm` commands and `dlm.from_pretrained`.

A second process that compiles the same program (same model, sampler knobs and
shapes) loads it from disk instead of compiling it again.  Where it lives, in
order: ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own setting, left as it is),
``--compile_cache=DIR`` / ``compile_cache=DIR``, ``$DLM_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/dlm/jax`` (``~/.cache/dlm/jax``).  ``off`` (flag, argument or
environment) turns it off.
"""

from __future__ import annotations

import os
import pathlib

OFF = ("off", "none", "0", "false")
_chosen: dict[str, str | None] = {}  # "dir": what the first enable() of this process decided


def default_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "dlm" / "jax"


def enable(where: str | os.PathLike | bool | None = None) -> str | None:
  """Points JAX's persistent cache at ``where`` (see the module docstring); the directory, or
  None when it is off.  A directory that cannot be created turns it off with a warning.
  ``where=None`` keeps an earlier choice of this process (the CLI's flag, say)."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if where is None and "dir" in _chosen:
    return _chosen["dir"]
  _chosen["dir"] = _resolve(jax, where)
  return _chosen["dir"]


def _resolve(jax, where: str | os.PathLike | bool | None) -> str | None:
  if where is None:
    where = os.environ.get("DLM_COMPILE_CACHE") or True
  if where is False or (isinstance(where, str) and where.lower() in OFF):
    if jax.config.jax_compilation_cache_dir is not None:
      jax.config.update("jax_compilation_cache_dir", None)
    return None
  path = default_dir() if where is True else pathlib.Path(where).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    import warnings
    warnings.warn(f"compile cache {path} cannot be created ({e.strerror}); compiling without"
                  " it (set --compile_cache=DIR or DLM_COMPILE_CACHE)", stacklevel=2)
    return None
  if jax.config.jax_compilation_cache_dir != str(path):
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every program, however quick to compile: a process start pays for many small ones
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return str(path)
