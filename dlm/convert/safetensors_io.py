"""Streaming safetensors reader/writer (numpy, bfloat16 through ml_dtypes), single or sharded.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype,
shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data
buffer (offsets relative to its start, C order, little endian).  Sharded
folders add ``model.safetensors.index.json`` = {"metadata": {...},
"weight_map": {name: shard file}}.  Tensors are read one at a time with
seek + readinto (no mmap: mapped pages would count in the process's memory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from dlm.errors import UserError

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
          "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
          "BOOL": np.dtype("bool")}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(UserError):
  """A safetensors file or folder that cannot be read as one."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute offsets in the file
  end: int
  path: pathlib.Path

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """The tensors of one file, validated against the file's size (a truncated file is an error)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path} not found; download the checkpoint again")
  size = path.stat().st_size
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path} is truncated: {size} bytes; download it again")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise CheckpointError(f"{path} is truncated or not safetensors (header of {n} bytes in a"
                            f" {size}-byte file); download it again")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} has a header that is not JSON ({e}); download it"
                            " again") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header is not a JSON object; download it again")
  base, out, needed = 8 + n, {}, 8 + n
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = DTYPES[spec["dtype"]]
      shape = tuple(int(d) for d in spec["shape"])
      begin, end = (int(x) for x in spec["data_offsets"])
    except KeyError as e:
      raise CheckpointError(f"{path}: tensor {name} has unknown dtype or fields ({e});"
                            " dlm reads " + ", ".join(DTYPES)) from None
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
      raise CheckpointError(f"{path}: tensor {name} spans {end - begin} bytes but shape {list(shape)}"
                            f" of {spec['dtype']} needs {math.prod(shape) * dtype.itemsize};"
                            " the file is damaged")
    out[name] = TensorInfo(name, dtype, shape, base + begin, base + end, path)
    needed = max(needed, base + end)
  if size < needed:
    raise CheckpointError(f"{path} is truncated: {size} bytes, the header needs {needed};"
                          " download it again")
  return out


class SafetensorsFolder:
  """The tensors of a folder (sharded with an index, or every *.safetensors) or of one file."""

  def __init__(self, path: str | os.PathLike):
    path = pathlib.Path(path)
    self._infos: dict[str, TensorInfo] = {}
    weight_map = None
    if path.is_file():
      files = [path]
    elif (path / INDEX).is_file():
      try:
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{path / INDEX} is not a safetensors index ({e}); download it"
                              " again") from None
      files = sorted({path / f for f in weight_map.values()})
      for f in files:
        if not f.is_file():
          raise CheckpointError(f"{path / INDEX} names {f.name}, which is missing; download it")
    else:
      files = sorted(path.glob("*.safetensors"))
      if not files:
        raise CheckpointError(f"no *.safetensors in {path}; download the model's weights there")
    for f in files:
      self._infos.update(read_header(f))
    if weight_map is not None:
      for name, shard in weight_map.items():
        info = self._infos.get(name)
        if info is None or info.path.name != shard:
          raise CheckpointError(f"{path / INDEX} puts {name} in {shard}, which does not hold it;"
                                " download the checkpoint again")

  def names(self) -> list[str]:
    return list(self._infos)

  def info(self, name: str) -> TensorInfo:
    return self._infos[name]

  def names_by_shard(self) -> dict[pathlib.Path, list[str]]:
    out: dict[pathlib.Path, list[str]] = {}
    for info in self._infos.values():
      out.setdefault(info.path, []).append(info.name)
    return out

  def total_bytes(self) -> int:
    return sum(i.nbytes for i in self._infos.values())

  def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
    info = self._infos[name]
    if out.shape != info.shape or out.dtype != info.dtype or not out.flags.c_contiguous:
      raise ValueError(f"read_into({name}): need a C-contiguous {info.dtype} {info.shape} array")
    with info.path.open("rb") as f:
      f.seek(info.begin)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
      raise CheckpointError(f"{info.path} ended while reading {name}; download it again")
    return out

  def read(self, name: str) -> np.ndarray:
    info = self._infos[name]
    return self.read_into(name, np.empty(info.shape, info.dtype))


def _header_bytes(specs: list[tuple[str, tuple[int, ...], np.dtype]],
                  metadata: dict[str, str] | None) -> bytes:
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, shape, dtype in specs:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


def write_folder(out_dir: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                 get: Callable[[str], np.ndarray], *, max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None) -> list[pathlib.Path]:
  """Writes shards of at most ``max_shard_bytes`` (HF names; an index when more than one).

  ``get(name)`` produces each tensor when its turn comes, so one tensor is held at a time.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if any(p.suffix == ".safetensors" or p.name == INDEX for p in out_dir.iterdir()):
    raise CheckpointError(f"{out_dir} already holds safetensors; write into an empty folder")
  specs = [(n, tuple(s), np.dtype(d)) for n, s, d in specs]
  shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
  size = 0
  for spec in specs:
    n = math.prod(spec[1]) * spec[2].itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += n
  k = len(shards)
  names = (["model.safetensors"] if k == 1 else
           [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)])
  written = []
  for file_name, shard in zip(names, shards):
    tmp = out_dir / (file_name + ".tmp")
    with tmp.open("wb") as f:
      f.write(_header_bytes(shard, metadata))
      for name, shape, dtype in shard:
        arr = np.asarray(get(name))
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.shape != shape or arr.dtype != dtype:
          raise ValueError(f"{name}: got {arr.dtype}{list(arr.shape)}, declared {dtype}{list(shape)}")
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, out_dir / file_name)
    written.append(out_dir / file_name)
  if k > 1:
    weight_map = {name: file_name for file_name, shard in zip(names, shards) for name, _, _ in shard}
    total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": weight_map}, indent=2))
  return written
