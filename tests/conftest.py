"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

The pod recipes' TPU compiles (tests/test_compile.py, ~2 minutes of libtpu compiling) start
in a background process as soon as the tests are collected and are checked last, so they
overlap with tests that mostly wait (multi-host heartbeats, signals, subprocesses).
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD_RECIPES = ("mdlm_small", "llada_1b", "llada_8b")
POD_TEST = "test_pod_recipe_compiles_and_fits_its_slice"
pod_compiles: dict = {}  # recipe -> (process, stdout path, stderr path, topology)


def recipe_topology(name: str) -> str:
  text = (ROOT / "configs" / f"{name}.py").read_text()
  return re.search(r'^TOPOLOGY = "([^"]+)"', text, flags=re.M).group(1)


def pytest_collection_modifyitems(session, config, items):
  pod = [it for it in items if POD_TEST in it.nodeid]
  if not pod or importlib.util.find_spec("libtpu") is None:
    return
  items[:] = [it for it in items if POD_TEST not in it.nodeid] + pod  # checked last
  out = pathlib.Path(tempfile.mkdtemp(prefix="dlm_pod_compile_"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmds = []
  for name in POD_RECIPES:
    topo = recipe_topology(name)
    stdout, stderr = out / f"{name}.out", out / f"{name}.err"
    cmds.append(f"'{sys.executable}' -m dlm.main compile --config=configs/{name}.py"
                f" --topology={topo} > '{stdout}' 2> '{stderr}'")
    pod_compiles[name] = (stdout, stderr, topo)
  # one after another (each uses both cores while compiling), beside the other tests
  proc = subprocess.Popen(["bash", "-c", "; ".join(cmds)], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL)
  pod_compiles["_process"] = proc


def pytest_sessionfinish(session, exitstatus):
  proc = pod_compiles.get("_process")
  if proc is not None and proc.poll() is None:
    proc.kill()
