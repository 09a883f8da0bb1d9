"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; one compilation cache."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent compilation cache for this run, inherited by the xdist workers and by the `dlm`
# processes the tests start: the same small train steps then compile once per run, not once per
# process.  Nothing is reused across runs (a fresh directory, removed at exit).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="dlm-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  _owner = os.getpid()
  atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache, ignore_errors=True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory) -> pathlib.Path:
  """A `configs/quickstart.py:smoke` run (CLI), trained once per test worker: the base model
  the post-training recipes' tests fine-tune."""
  from recipes import ROOT, dlm  # noqa: PLC0415
  workdir = tmp_path_factory.mktemp("smoke_base") / "base"
  dlm("train", f"--config={ROOT}/configs/quickstart.py:smoke", f"--workdir={workdir}")
  return workdir
