"""Model folders from elsewhere (issue 15): bad dtypes, shard names, config.json and garbled bytes
are one-line errors naming the file and the fix, before anything is allocated or written."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tracemalloc
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

import dlm
from dlm.convert import families, hf, safetensors_io as st
from dlm.convert import workdir as convert_workdir
from dlm.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
LLADA_LAYER1_OUT = "model.transformer.blocks.1.ff_out.weight"
LLADA_EMBED = "model.transformer.wte.weight"
DREAM_EMBED = "model.embed_tokens.weight"


# ----------------------------------------------------------------------------- helpers


def _copy(tmp_path: pathlib.Path, family: str, name: str = "src") -> pathlib.Path:
  d = tmp_path / name
  shutil.copytree(FIXTURES / f"{family}-tiny", d)
  return d


def _snapshot(root: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256 or link target} of everything under ``root`` (links not followed)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      p = pathlib.Path(dirpath) / name
      rel = str(p.relative_to(root))
      if p.is_symlink():
        out[rel] = "-> " + os.readlink(p)
      elif p.is_file():
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
      else:
        out[rel] = "dir"
  return out


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
  msg = str(excinfo.value)
  assert msg and "\n" not in msg, msg
  return msg


def _refused(call: Callable[[], Any]) -> str:
  """The one-line UserError message of ``call()``."""
  with pytest.raises(UserError) as e:
    call()
  return _one_line(e)


def _rewrite(src: pathlib.Path, change: Callable[[str, np.ndarray], np.ndarray] = lambda n, x: x,
             max_shard_bytes: int = 1 << 30) -> None:
  """Rewrites the safetensors of ``src`` (tensor by tensor through ``change``), maybe sharded."""
  folder = st.SafetensorsFolder(src)
  arrays = {n: change(n, folder.read(n)) for n in folder.names()}
  for f in list(src.glob("*.safetensors")) + list(src.glob(st.INDEX)):
    f.unlink()
  tmp = src.parent / (src.name + ".new")
  st.write_folder(tmp, [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__,
                  max_shard_bytes=max_shard_bytes)
  for f in tmp.iterdir():
    os.replace(f, src / f.name)
  tmp.rmdir()


def _relabel(path: pathlib.Path, tensor: str, dtype: str) -> None:
  """Calls ``tensor``'s bytes ``dtype`` in the header of ``path`` (the data stays as it is)."""
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  header[tensor]["dtype"] = dtype
  new = json.dumps(header).encode()
  new += b" " * (-len(new) % 8)
  path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _edit_config(src: pathlib.Path, **changes: Any) -> pathlib.Path:
  path = src / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))
  return path


def _dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


# ----------------------------------------------------------------------------- 1. dtypes


@pytest.mark.parametrize("family,tensor", [("llada", LLADA_EMBED), ("llada", LLADA_LAYER1_OUT),
                                           ("dream", DREAM_EMBED),
                                           ("dream", "model.layers.1.self_attn.k_proj.bias")])
def test_int_header_over_float_bytes_is_refused(tmp_path, family, tensor):
  src = _copy(tmp_path, family)
  _relabel(src / "model.safetensors", tensor, "I32")  # the same bytes, called I32
  before = _snapshot(tmp_path)
  msg = _refused(lambda: dlm.from_pretrained(src))
  assert str(src / "model.safetensors") in msg and tensor in msg and "I32" in msg, msg
  assert "floating parameter" in msg and "download it again" in msg, msg
  msg2 = _refused(lambda: convert_workdir.convert(src, tmp_path / "work", expected=family))
  assert msg2 == msg
  assert _snapshot(tmp_path) == before  # no workdir, no staging folder, src unchanged


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_])
def test_integer_and_bool_tensors_never_become_parameters(tmp_path, dtype):
  src = _copy(tmp_path, "llada")
  _rewrite(src, lambda n, x: x.astype(dtype) if n == LLADA_LAYER1_OUT else x)
  msg = _refused(lambda: hf.load_params(src))
  name = st.name_of(dtype)
  assert f"tensor {LLADA_LAYER1_OUT} is stored as {name}" in msg, msg
  assert str(src / "model.safetensors") in msg and "F64/F32/F16/BF16" in msg, msg


def test_floating_dtypes_still_load(tmp_path):
  src = _copy(tmp_path, "llada")
  _rewrite(src, lambda n, x: x.astype(np.float16 if n == LLADA_EMBED else ml_dtypes.bfloat16))
  _, _, _, params = hf.load_params(src)
  assert params["embed"].dtype == np.float16
  assert params["blocks"]["mlp"]["w_out"].dtype == ml_dtypes.bfloat16
  assert st.is_floating(ml_dtypes.bfloat16) and st.is_floating(np.float64)
  assert not st.is_floating(np.int32) and not st.is_floating(np.bool_)


# ----------------------------------------------------------------------------- 2. shard names


class _OpenSpy:
  """Records every path opened (builtins.open, io.open, os.open) while installed."""

  def __init__(self, monkeypatch: pytest.MonkeyPatch):
    self.paths: list[str] = []
    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
      monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

  def _wrap(self, fn: Callable) -> Callable:
    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
      if isinstance(file, (str, os.PathLike)):
        self.paths.append(os.path.realpath(file))
      return fn(file, *args, **kwargs)
    return spy

  def opened_under(self, root: pathlib.Path) -> list[str]:
    root = os.path.realpath(root)
    return [p for p in self.paths if p == root or p.startswith(root + os.sep)]


def _sharded(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, str]:
  """(a sharded llada folder, a folder outside it holding a valid copy of a shard, that shard)."""
  src = _copy(tmp_path, "llada")
  _rewrite(src, max_shard_bytes=100_000)
  shards = sorted(p.name for p in src.glob("model-*.safetensors"))
  assert len(shards) > 2
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.copyfile(src / shards[-1], outside / "x.safetensors")  # readable if ever opened
  return src, outside, shards[-1]


def _point_shard(src: pathlib.Path, shard: str, name: Any) -> None:
  index = json.loads((src / st.INDEX).read_text())
  index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
  (src / st.INDEX).write_text(json.dumps(index))


def _bad_names(src: pathlib.Path, outside: pathlib.Path) -> list[tuple[str, str]]:
  """(shard name, what the message says) for names that leave the folder or are no file names."""
  (src / "link.safetensors").symlink_to(outside / "x.safetensors")
  (src / "linkdir").symlink_to(outside, target_is_directory=True)
  (src / "sub").mkdir()
  return [("../outside/x.safetensors", "not a file name inside"),
          (str(outside / "x.safetensors"), "not a file name inside"),
          ("sub/../../outside/x.safetensors", "not a file name inside"),
          ("a\\..\\..\\outside\\x.safetensors", "not a file name inside"),
          ("x\0.safetensors", "not a file name inside"),
          ("", "not a file name inside"),
          ("link.safetensors", f"resolves to {(outside / 'x.safetensors').resolve()}"),
          ("linkdir/x.safetensors", "outside")]


def test_index_shard_names_stay_inside_the_folder(tmp_path, monkeypatch):
  src, outside, shard = _sharded(tmp_path)
  cases = _bad_names(src, outside)
  index = (src / st.INDEX).read_text()
  for name, needle in cases:
    (src / st.INDEX).write_text(index)
    _point_shard(src, shard, name)
    spy = _OpenSpy(monkeypatch)
    msg = _refused(lambda: st.SafetensorsFolder(src))
    monkeypatch.undo()
    assert needle in msg and str(src / st.INDEX) in msg and repr(name) in msg, (name, msg)
    assert "inside its folder" in msg, msg
    assert not spy.opened_under(outside), (name, spy.opened_under(outside))
    assert not any(p.endswith(shard) for p in spy.paths)  # no shard is opened before the check
  (src / st.INDEX).write_text(index)
  _point_shard(src, shard, 7)
  assert "not a safetensors index" in _refused(lambda: st.SafetensorsFolder(src))


def test_bad_shard_name_through_from_pretrained_and_convert(tmp_path):
  src, outside, shard = _sharded(tmp_path)
  _point_shard(src, shard, "../outside/x.safetensors")
  before = _snapshot(tmp_path)
  msg = _refused(lambda: dlm.from_pretrained(src))
  assert "'../outside/x.safetensors'" in msg and str(src / st.INDEX) in msg
  assert _refused(lambda: convert_workdir.convert(src, tmp_path / "w", expected="llada")) == msg
  assert _snapshot(tmp_path) == before


def test_links_out_of_an_unindexed_folder_are_refused(tmp_path):
  src = _copy(tmp_path, "llada")
  outside = tmp_path / "elsewhere.safetensors"
  os.replace(src / "model.safetensors", outside)
  (src / "model.safetensors").symlink_to(outside)
  msg = _refused(lambda: st.SafetensorsFolder(src))
  assert "'model.safetensors'" in msg and f"resolves to {outside.resolve()}" in msg
  src2 = _copy(tmp_path, "llada", "src2")
  (tmp_path / "tok.json").write_text("{}")
  (src2 / "tokenizer.json").symlink_to(tmp_path / "tok.json")
  msg = _refused(lambda: convert_workdir.convert(src2, tmp_path / "w", expected="llada"))
  assert "'tokenizer.json'" in msg and not (tmp_path / "w").exists()


def test_files_inside_the_folder_and_hub_cache_links_still_load(tmp_path):
  src, _, shard = _sharded(tmp_path)
  (src / "shards").mkdir()
  os.replace(src / shard, src / "shards" / shard)
  _point_shard(src, shard, f"shards/{shard}")
  _, _, _, params = hf.load_params(src)
  _, _, _, want = hf.load_params(FIXTURES / "llada-tiny")
  np.testing.assert_array_equal(params["head"], want["head"])
  # huggingface_hub's cache: snapshots/REV/* are links to ../../blobs/SHA
  repo = tmp_path / "models--org--tiny"
  (repo / "blobs").mkdir(parents=True)
  snap = repo / "snapshots" / "0123abc"
  snap.mkdir(parents=True)
  for f in (FIXTURES / "llada-tiny").iterdir():
    blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
    shutil.copyfile(f, blob)
    (snap / f.name).symlink_to(os.path.relpath(blob, snap))
  _, _, _, params = hf.load_params(snap)
  np.testing.assert_array_equal(params["embed"], want["embed"])
  assert dlm.from_pretrained(snap).model_cfg.vocab_size == 256


# ----------------------------------------------------------------------------- 3. config.json


CONFIG_CASES = [
    ("llada", {"n_heads": "4"}, "n_heads='4' is not an integer in [1, 2147483647]"),
    ("llada", {"d_model": True}, "d_model=True is not an integer"),
    ("llada", {"n_layers": 0}, "n_layers=0 is not an integer"),
    ("llada", {"n_layers": 2.0}, "n_layers=2.0 is not an integer"),
    ("llada", {"mlp_hidden_size": -128}, "mlp_hidden_size=-128"),
    ("llada", {"embedding_size": 10**12}, "embedding_size=1000000000000 is not an integer"),
    ("llada", {"vocab_size": "256", "embedding_size": None}, "vocab_size='256'"),
    ("llada", {"rope_theta": "5e5"}, "rope_theta='5e5' is not a finite positive number"),
    ("llada", {"rope_theta": float("nan")}, "rope_theta=nan"),
    ("llada", {"rope_theta": -1.0}, "rope_theta=-1.0"),
    ("llada", {"rms_norm_eps": 0}, "rms_norm_eps=0"),
    ("llada", {"weight_tying": "false"}, "weight_tying='false' is not true or false"),
    ("llada", {"d_model": 66}, "d_model=66 is not divisible by n_heads=4"),
    ("llada", {"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ("llada", {"mask_token_id": 256}, "mask_token_id=256 is not an integer in [0, 255]"),
    ("llada", {"mask_token_id": None}, "no mask_token_id and the llada default 126336"),
    ("llada", {"eos_token_id": -1}, "eos_token_id=-1"),
    ("llada", {"pad_token_id": [1, 2]}, "pad_token_id=[1, 2]"),
    ("llada", {"max_sequence_length": "long"}, "max_sequence_length='long'"),
    ("llada", {"d_model": None}, "lacks ['d_model']"),
    ("llada", {"n_heads": "x" * 1000}, "..."),  # a long value is shortened, still one line
    ("dream", {"vocab_size": 10**12}, "vocab_size=1000000000000 is not an integer"),
    ("dream", {"num_attention_heads": "4"}, "num_attention_heads='4'"),
    ("dream", {"tie_word_embeddings": "no"}, "tie_word_embeddings='no'"),
    ("dream", {"hidden_size": 0}, "hidden_size=0"),
    ("dream", {"num_key_value_heads": 0}, "num_key_value_heads=0"),
    ("dream", {"max_position_embeddings": 1e9}, "max_position_embeddings=1000000000.0"),
]


@pytest.mark.parametrize("family,changes,needle", CONFIG_CASES,
                         ids=[f"{f}-{'-'.join(c)}" for f, c, _ in CONFIG_CASES])
def test_config_numbers_are_checked(tmp_path, family, changes, needle):
  src = _copy(tmp_path, family)
  path = _edit_config(src, **changes)
  before = _snapshot(tmp_path)
  msg = _refused(lambda: convert_workdir.convert(src, tmp_path / "w", expected=family))
  assert needle in msg and str(path) in msg, msg
  assert len(msg) < 400, msg
  assert _snapshot(tmp_path) == before
  assert _refused(lambda: dlm.from_pretrained(src)) == msg


SHAPE_CASES = [
    ("llada", {"n_layers": 10**9}, "implies 9000000003 tensors"),
    ("llada", {"n_layers": 3}, "implies 30 tensors"),
    ("llada", {"embedding_size": 2**31 - 1}, f"implies [{2**31 - 1}, 64]"),
    ("llada", {"mlp_hidden_size": 2**31 - 1}, f"implies [{2**31 - 1}, 64]"),
    ("dream", {"vocab_size": 2**31 - 1}, f"implies [{2**31 - 1}, 64]"),
    ("dream", {"hidden_size": 2**30, "num_attention_heads": 2**20, "num_key_value_heads": 2**19},
     "the weights do not match config.json"),
]


@pytest.mark.parametrize("family,changes,needle", SHAPE_CASES)
def test_sizes_the_weights_do_not_hold_are_refused_before_allocating(tmp_path, family, changes,
                                                                      needle):
  src = _copy(tmp_path, family)
  path = _edit_config(src, **changes)
  hf.load_params(FIXTURES / f"{family}-tiny")  # warm: imports and caches are not counted below
  tracemalloc.start()
  try:
    msg = _refused(lambda: hf.load_params(src))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert needle in msg and str(path) in msg and "use the config.json that came with" in msg, msg
  assert peak < 16 * 2**20, peak  # the fixture's weights are 0.5 MB; nothing of the sizes named


@pytest.mark.parametrize("content,needle", [
    (b'{"model_type": "llada", \x96}', "is not UTF-8 text (byte 0x96 at offset 24)"),
    (b"\xff\xfe{\x00}\x00", "is not UTF-8 text"),
    (b"{not json", "is not JSON (Expecting property name"),
    (b"", "is not JSON"),
    (b"[1, 2]", "is a JSON list, not an object"),
    (b'{"n_layers": ' + b"1" * 5000 + b"}", "is not readable JSON"),
])
def test_unreadable_config_json_is_one_line_naming_it(tmp_path, content, needle):
  src = _copy(tmp_path, "llada")
  (src / "config.json").write_bytes(content)
  msg = _refused(lambda: convert_workdir.convert(src, tmp_path / "w", expected="llada"))
  assert needle in msg and str(src / "config.json") in msg, msg
  assert "codec can't decode" not in msg
  assert not (tmp_path / "w").exists()


def test_check_helpers():
  assert families.check_size("c", "k", 3) == 3
  assert families.check_positive("c", "k", 1e-6) == 1e-6
  for bad in (True, 1.0, "1", None, 0, 2**31):
    with pytest.raises(UserError):
      families.check_size("c", "k", bad)
  for bad in (True, "1", float("inf"), float("nan"), 0, -1e-3):
    with pytest.raises(UserError):
      families.check_positive("c", "k", bad)
  families.check_flag("c", "k", None)
  families.check_flag("c", "k", False)
  with pytest.raises(UserError):
    families.check_flag("c", "k", 0)


# ----------------------------------------------------------------------------- 4. garbled bytes


def test_garbled_header_bytes_name_the_file(tmp_path):
  src = _copy(tmp_path, "dream")
  path = src / "model.safetensors"
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  path.write_bytes(raw[:10] + b"\x96" + raw[11:])
  msg = _refused(lambda: dlm.from_pretrained(src))
  assert msg.startswith(str(path)) and "not UTF-8: byte 0x96 at header offset 2" in msg, msg
  assert "codec" not in msg
  rng = np.random.default_rng(15)
  outcomes = set()
  for _ in range(40):
    start = int(rng.integers(0, 8 + n - 1))
    size = int(rng.integers(1, 17))
    junk = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(raw[:start] + junk + raw[start + size:])
    try:
      hf.load_params(src)
      outcomes.add("loaded")
    except UserError as e:
      msg = str(e)
      assert "\n" not in msg and str(src) in msg, (start, size, msg)
      outcomes.add("refused")
  assert "refused" in outcomes


def test_garbled_index_names_the_file(tmp_path):
  src, _, _ = _sharded(tmp_path)
  index = src / st.INDEX
  raw = bytearray(index.read_bytes())
  raw[5:9] = b"\x96\x00\xff\x13"
  index.write_bytes(bytes(raw))
  msg = _refused(lambda: st.SafetensorsFolder(src))
  assert str(index) in msg and "not a safetensors index" in msg, msg


# ----------------------------------------------------------------------------- the workdir


def test_failed_convert_leaves_the_disk_as_it_was(tmp_path, monkeypatch):
  src = _copy(tmp_path, "llada")
  (tmp_path / "empty").mkdir()
  (tmp_path / "afile").write_text("keep")
  before = _snapshot(tmp_path)
  msg = _refused(lambda: convert_workdir.convert(src, tmp_path / "afile", expected="llada"))
  assert "is a file" in msg
  msg = _refused(lambda: convert_workdir.convert(src, tmp_path / "afile" / "w", expected="llada"))
  assert f"could not write {tmp_path / 'afile' / 'w'}" in msg, msg
  assert _snapshot(tmp_path) == before

  def disk_full(workdir, *args, **kwargs):
    (pathlib.Path(workdir) / "checkpoints").mkdir()
    (pathlib.Path(workdir) / "checkpoints" / "partial").write_bytes(b"x" * 100)
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(convert_workdir.checkpoint, "save_host_arrays", disk_full)
  for work in (tmp_path / "empty", tmp_path / "new" / "deeper" / "work"):
    msg = _refused(lambda: convert_workdir.convert(src, work, expected="llada"))
    assert f"could not write {work} (No space left on device)" in msg, msg
    assert _snapshot(tmp_path) == before  # no staging folder, no new parents, empty stays empty
  monkeypatch.undo()
  work = convert_workdir.convert(src, tmp_path / "empty", expected="llada")
  assert (work / "config.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "src"]
  msg = _refused(lambda: convert_workdir.convert(src, work, expected="llada"))
  assert "is not empty" in msg


def test_cli_convert_of_a_relabelled_checkpoint_is_one_line(tmp_path):
  src = _copy(tmp_path, "llada")
  _relabel(src / "model.safetensors", LLADA_EMBED, "I32")
  before = _snapshot(tmp_path)
  r = _dlm("convert", "--from=llada", f"--src={src}", f"--workdir={tmp_path / 'w'}")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and len(lines) == 1, r.stderr
  assert "is stored as I32" in lines[0] and str(src / "model.safetensors") in lines[0]
  assert _snapshot(tmp_path) == before
