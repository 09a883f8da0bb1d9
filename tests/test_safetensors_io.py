"""The safetensors reader/writer: byte-level format, dtypes, shards, and damaged files."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from dlm.convert import safetensors_io as st


def _tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"a": rng.standard_normal((3, 5)).astype(np.float32),
          "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
          "c": np.arange(6, dtype=np.int64).reshape(2, 3),
          "d": np.array(2.5, np.float16),  # 0-d
          "e": np.zeros((0, 4), np.float32),  # empty
          "f": np.array([True, False])}


def _write(tmp_path, tensors, max_shard_bytes=1 << 30):
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  return st.write_folder(tmp_path, specs, tensors.__getitem__, max_shard_bytes=max_shard_bytes)


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 40])
def test_round_trip_single_and_sharded(tmp_path, max_shard_bytes):
  tensors = _tensors()
  files = _write(tmp_path, tensors, max_shard_bytes)
  assert (len(files) > 1) == (max_shard_bytes == 40)
  assert (tmp_path / st.INDEX).exists() == (len(files) > 1)
  folder = st.SafetensorsFolder(tmp_path)
  assert sorted(folder.names()) == sorted(tensors)
  for k, v in tensors.items():
    got = folder.read(k)
    assert got.dtype == v.dtype and got.shape == v.shape
    assert got.tobytes() == v.tobytes()
  out = np.empty((3, 5), np.float32)
  assert folder.read_into("a", out) is out and np.array_equal(out, tensors["a"])
  assert folder.total_bytes() == sum(v.nbytes for v in tensors.values())


def test_reads_a_hand_built_file_and_writes_the_same_layout(tmp_path):
  x = np.arange(4, dtype=np.float32)
  header = json.dumps({"__metadata__": {"format": "pt"},
                       "x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
  (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + x.tobytes())
  np.testing.assert_array_equal(st.SafetensorsFolder(tmp_path / "m.safetensors").read("x"),
                                x.reshape(2, 2))
  out = tmp_path / "ours"
  st.write_folder(out, [("x", (2, 2), np.float32)], lambda _: x.reshape(2, 2))
  raw = (out / "model.safetensors").read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  assert n % 8 == 0 and json.loads(raw[8:8 + n])["x"] == {"dtype": "F32", "shape": [2, 2],
                                                          "data_offsets": [0, 16]}
  assert raw[8 + n:] == x.tobytes()


def _one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


def test_damaged_files_are_one_line_errors(tmp_path):
  _write(tmp_path / "ok", _tensors())
  path = tmp_path / "ok" / "model.safetensors"
  raw = path.read_bytes()
  path.write_bytes(raw[:-3])
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path / "ok")
  assert "truncated" in _one_line(e)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(bad)
  assert "not JSON" in _one_line(e)
  header = json.dumps({"x": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}).encode()
  (bad / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(bad)
  assert "unknown dtype" in _one_line(e)
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path / "empty_dir_that_is_missing")
  assert "no *.safetensors" in _one_line(e)


def test_index_naming_a_missing_shard_and_no_overwrite(tmp_path):
  _write(tmp_path, _tensors(), max_shard_bytes=40)
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(st.CheckpointError) as e:
    st.SafetensorsFolder(tmp_path)
  assert shard.name in _one_line(e)
  with pytest.raises(st.CheckpointError) as e:
    _write(tmp_path, _tensors())
  assert "already holds safetensors" in _one_line(e)
