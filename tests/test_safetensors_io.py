"""The safetensors reader/writer: byte-level format, dtypes, shards, damaged files, memory."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from dlm.convert import safetensors_io as st

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"a": rng.standard_normal((3, 5)).astype(np.float32),
          "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
          "c": np.arange(6, dtype=np.int64).reshape(2, 3),
          "d": np.array(2.5, np.float16),  # 0-d
          "e": np.zeros((0, 4), np.float32),  # empty
          "f": np.array([True, False, True]),
          "g": rng.standard_normal((2, 2)),  # float64
          "h": np.array([-3, 4], np.int32), "i": np.array([-5, 6, 7], np.int16),
          "j": np.array([-8, 9], np.int8), "k": np.array([250, 1, 2], np.uint8)}


def _write(out, tensors, max_shard_bytes=1 << 30, metadata=None):
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  return st.write_folder(out, specs, tensors.__getitem__, max_shard_bytes=max_shard_bytes,
                         metadata=metadata)


def _one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert msg and "\n" not in msg, msg
  return msg


def _raw_file(entries: dict, data: bytes, pad: bool = False) -> bytes:
  header = json.dumps(entries).encode()
  if pad:
    header += b" " * (-len(header) % 8)
  return struct.pack("<Q", len(header)) + header + data


def test_dtype_names_both_ways():
  assert st.dtype_of("BF16") == np.dtype(ml_dtypes.bfloat16)
  assert st.name_of(ml_dtypes.bfloat16) == "BF16" and st.name_of(np.float32) == "F32"
  assert all(st.name_of(st.dtype_of(n)) == n for n in st.DTYPES)
  with pytest.raises(st.CheckpointError):
    st.name_of(np.complex64)
  with pytest.raises(st.CheckpointError):
    st.dtype_of("F8_E4M3")


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 40])
def test_round_trip_single_and_sharded(tmp_path, max_shard_bytes):
  tensors = _tensors()
  files = _write(tmp_path, tensors, max_shard_bytes, metadata={"format": "pt"})
  sharded = max_shard_bytes == 40
  assert (len(files) > 1) == sharded and all(f.is_file() for f in files)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [f.name for f in files] + ([st.INDEX] if sharded else []))
  if sharded:
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / st.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
  else:
    assert [f.name for f in files] == ["model.safetensors"]
  assert st.read_metadata(files[0]) == {"format": "pt"}
  folder = st.SafetensorsFolder(tmp_path)
  assert sorted(folder.names()) == sorted(tensors) and len(folder) == len(tensors)
  by_shard = folder.names_by_shard()
  assert list(by_shard) == files and sorted(sum(by_shard.values(), [])) == sorted(tensors)
  for k, v in tensors.items():
    got = folder.read(k)
    assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes()
    assert folder.shard_of(k) in files and k in by_shard[folder.shard_of(k)]
    assert folder.info(k).begin % v.dtype.itemsize == 0  # aligned as the reference writer does
    out = np.full(v.shape, 1, v.dtype)
    assert folder.read_into(k, out) is out and out.tobytes() == v.tobytes()
  assert folder.total_bytes() == sum(v.nbytes for v in tensors.values())
  with pytest.raises(ValueError):
    folder.read_into("a", np.empty((5, 3), np.float32))
  with pytest.raises(ValueError):
    folder.read_into("a", np.empty((5, 3), np.float32).T)  # not C-contiguous
  # A single file opens on its own too.
  assert sorted(st.SafetensorsFolder(files[0]).names()) == sorted(st.read_header(files[0]))


def test_reads_hand_built_files_and_index(tmp_path):
  x = np.arange(4, dtype="<f4")
  bf = struct.pack("<3H", 0x3F80, 0xC000, 0x0000)  # bf16 1.0, -2.0, 0.0
  ints = struct.pack("<2q", -1, 2**40)
  entries = {"__metadata__": {"format": "pt"},
             "x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
             "i": {"dtype": "I64", "shape": [2], "data_offsets": [16, 32]},
             "b": {"dtype": "BF16", "shape": [3], "data_offsets": [32, 38]},
             "s": {"dtype": "F32", "shape": [], "data_offsets": [38, 42]},
             "z": {"dtype": "F16", "shape": [0, 3], "data_offsets": [42, 42]}}
  d = tmp_path / "hf"
  d.mkdir()
  (d / "a.safetensors").write_bytes(
      _raw_file(entries, x.tobytes() + ints + bf + struct.pack("<f", 7.5)))
  (d / "b.safetensors").write_bytes(
      _raw_file({"y": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}, b"\x01\x02\xff"))
  (d / st.INDEX).write_text(json.dumps({"metadata": {"total_size": 45}, "weight_map": {
      "x": "a.safetensors", "i": "a.safetensors", "b": "a.safetensors", "s": "a.safetensors",
      "z": "a.safetensors", "y": "b.safetensors"}}))
  folder = st.SafetensorsFolder(d)
  np.testing.assert_array_equal(folder.read("x"), x.reshape(2, 2))
  np.testing.assert_array_equal(folder.read("i"), [-1, 2**40])
  b = folder.read("b")
  assert b.dtype == ml_dtypes.bfloat16 and b.astype(np.float32).tolist() == [1.0, -2.0, 0.0]
  assert folder.read("s").shape == () and folder.read("s") == 7.5
  assert folder.read("z").shape == (0, 3) and folder.read("z").dtype == np.float16
  assert folder.read("y").tolist() == [1, 2, 255]
  assert folder.names_by_shard() == {d / "a.safetensors": ["x", "i", "b", "s", "z"],
                                     d / "b.safetensors": ["y"]}
  assert st.read_metadata(d / "a.safetensors") == {"format": "pt"}
  assert st.read_metadata(d / "b.safetensors") == {}
  assert folder.total_bytes() == 45


def test_writer_output_parsed_by_hand(tmp_path):
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.0, -2.0], ml_dtypes.bfloat16)
  specs = [("b", (2,), ml_dtypes.bfloat16), ("x", (2, 3), np.float32)]
  st.write_folder(tmp_path / "o", specs, {"x": x, "b": b}.__getitem__,
                  metadata={"format": "pt"})
  raw = (tmp_path / "o" / "model.safetensors").read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  text = raw[8:8 + n].decode()
  assert n % 8 == 0 and text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
  header = json.loads(text)
  assert header["__metadata__"] == {"format": "pt"}
  # Wider items first (F32 before BF16), so every tensor is aligned to its itemsize.
  assert header["x"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
  assert header["b"] == {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]}
  data = raw[8 + n:]
  assert data[:24] == struct.pack("<6f", *range(6))
  assert data[24:] == struct.pack("<2H", 0x3F80, 0xC000) and len(data) == 28


def test_damaged_files_are_one_line_errors(tmp_path):
  _write(tmp_path / "ok", _tensors())
  path = tmp_path / "ok" / "model.safetensors"
  raw = path.read_bytes()
  path.write_bytes(raw[:-3])
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path / "ok")
  assert f"is truncated: {len(raw) - 3} bytes, the header needs {len(raw)}" in _one_line(e)
  assert "download it again" in str(e.value)
  path.write_bytes(raw[:5])
  with pytest.raises(st.CheckpointError) as e:
    st.read_header(path)
  assert "truncated" in _one_line(e)

  bad = tmp_path / "bad" / "x.safetensors"
  bad.parent.mkdir()
  cases = [
      (struct.pack("<Q", 7) + b"{nope\n}", "not JSON"),
      (struct.pack("<Q", 3) + b"\xff\xfe{", "not JSON"),
      (struct.pack("<Q", 200 * 2**20) + b"{}", "not safetensors"),
      (_raw_file({"x": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
       "unknown dtype 'F8_E9'"),
      (_raw_file({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(12)),
       "spans 8 bytes but shape [3] of F32 needs 12"),
      (_raw_file({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
       "overlap"),
      (_raw_file({"x": {"dtype": "F32", "shape": [2], "data_offsets": [100, 108]}}, bytes(8)),
       "truncated"),
      (_raw_file({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
       "malformed"),
      (_raw_file([1, 2], b""), "not a JSON object"),
      (struct.pack("<Q", 20) + b'{"a": 1,\n "a": 2}   ', "not JSON"),
  ]
  for content, needle in cases:
    bad.write_bytes(content)
    with pytest.raises(st.CheckpointError) as e:
      st.SafetensorsFolder(bad.parent)
    assert needle in _one_line(e) and str(bad) in str(e.value), (needle, str(e.value))

  with pytest.raises(st.CheckpointError) as e:
    st.read_header(tmp_path / "missing.safetensors")
  assert "not found" in _one_line(e)
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path / "missing_dir")
  assert "not found" in _one_line(e)
  (tmp_path / "empty").mkdir()
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path / "empty")
  assert f"no *.safetensors in {tmp_path / 'empty'}" in _one_line(e)


def test_bad_index_and_missing_tensors(tmp_path):
  _write(tmp_path, _tensors(), max_shard_bytes=40)
  index = json.loads((tmp_path / st.INDEX).read_text())
  folder = st.SafetensorsFolder(tmp_path)
  with pytest.raises(st.CheckpointError) as e:
    folder.read("nope")
  assert "'nope' is not in" in _one_line(e)
  index["weight_map"]["ghost"] = index["weight_map"]["a"]
  (tmp_path / st.INDEX).write_text(json.dumps(index))
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path)
  assert "'ghost'" in _one_line(e) and "does not hold it" in str(e.value)
  (tmp_path / st.INDEX).write_text("{not json")
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path)
  assert "not a safetensors index" in _one_line(e)
  del index["weight_map"]["ghost"]
  (tmp_path / st.INDEX).write_text(json.dumps(index))
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path)
  assert f"names {shard.name}, which is missing" in _one_line(e)


def test_writer_never_overwrites_and_cleans_up(tmp_path):
  _write(tmp_path / "a", _tensors())
  before = sorted((tmp_path / "a").iterdir())
  with pytest.raises(st.CheckpointError) as e:
    _write(tmp_path / "a", _tensors())
  assert "not an empty folder" in _one_line(e)
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "notes.txt").write_text("keep")
  with pytest.raises(st.CheckpointError) as e:
    _write(tmp_path / "b", _tensors())
  assert "pick a new folder" in _one_line(e)
  assert sorted((tmp_path / "a").iterdir()) == before

  def failing(name):
    if name == "c":
      raise RuntimeError("boom")
    return _tensors()[name]

  specs = [(k, v.shape, v.dtype) for k, v in _tensors().items()]
  with pytest.raises(RuntimeError):
    st.write_folder(tmp_path / "c", specs, failing, max_shard_bytes=40)
  assert list((tmp_path / "c").iterdir()) == []
  with pytest.raises(ValueError, match="declared"):
    st.write_folder(tmp_path / "d", [("x", (2,), np.float32)], lambda _: np.zeros(3, np.float32))
  assert list((tmp_path / "d").iterdir()) == []
  with pytest.raises(st.CheckpointError) as e:
    st.write_folder(tmp_path / "e", [("x", (2,), np.complex64)], lambda _: None)
  _one_line(e)
  with pytest.raises(st.CheckpointError) as e:
    st.write_folder(tmp_path / "e", [("x", (2,), np.int8)] * 2, lambda _: None)
  assert "unique" in _one_line(e)


_MEMORY_CHILD = r"""
import json, resource, sys
import numpy as np
from dlm.convert import safetensors_io as st

def peak():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

out, n, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = peak()
specs = [(f"t{i}", (n,), np.float32) for i in range(count)]
st.write_folder(out, specs, lambda name: np.full((n,), int(name[1:]), np.float32),
                max_shard_bytes=4 * n)
write = peak()
folder = st.SafetensorsFolder(out)
assert len(folder.names_by_shard()) == count
for name in folder.names():
  x = folder.read(name)
  assert x[0] == x[-1] == int(name[1:])
  del x
read = peak()
arrays = {n: np.empty(folder.info(n).shape, folder.info(n).dtype) for n in folder.names()}
for name, array in arrays.items():
  folder.read_into(name, array)
read_into = peak()
assert all(a[0] == a[-1] == int(name[1:]) for name, a in arrays.items())
print(json.dumps({"base": base, "write": write, "read": read, "read_into": read_into,
                  "arrays": sum(a.nbytes for a in arrays.values())}))
"""


def test_peak_memory_is_one_tensor_or_the_destination(tmp_path):
  n, count = 12 * 2**20, 4  # 4 shards of one 48 MiB float32 tensor each: 192 MiB
  proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "ckpt"), str(n),
                         str(count)], capture_output=True, text=True, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  m = json.loads(proc.stdout.strip().splitlines()[-1])
  tensor = 4 * n
  assert m["arrays"] == count * tensor
  # Writing and reading tensor by tensor hold about one tensor, never a whole file or folder.
  assert m["write"] - m["base"] < 1.5 * tensor, m
  assert m["read"] - m["base"] < 1.5 * tensor, m
  # read_into adds nothing on top of the caller's destination arrays.
  assert m["read_into"] - m["base"] < 1.15 * m["arrays"], m
