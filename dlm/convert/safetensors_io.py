"""Streaming safetensors reader/writer (numpy, bfloat16 through ml_dtypes), single or sharded.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype,
shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data
buffer (offsets relative to its start, C order, little endian).  Sharded
folders add ``model.safetensors.index.json`` = {"metadata": {"total_size": ...},
"weight_map": {name: shard file}}.

Tensors are read one at a time with seek + readinto straight into the numpy
array (no mmap: mapped pages would count in the process's resident memory, and
no whole-file reads), and written one at a time as the caller produces them,
so host memory stays near the largest tensor on top of what the caller keeps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Any, Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from dlm.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("bool")}
NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOATING = ("F64", "F32", "F16", "BF16")  # the dtypes a floating parameter may be stored in
MAX_INDEX_BYTES = 100 * 2**20


class CheckpointError(UserError):
  """A safetensors file or folder that cannot be read or written; one line naming the fix."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


def dtype_of(name: str) -> np.dtype:
  """The numpy dtype of a safetensors dtype name ("BF16" -> ml_dtypes.bfloat16)."""
  if name not in DTYPES:
    raise CheckpointError(f"unknown safetensors dtype {name!r}; dlm reads {', '.join(DTYPES)}")
  return DTYPES[name]


def name_of(dtype: Any) -> str:
  """The safetensors dtype name of a numpy dtype (ml_dtypes.bfloat16 -> "BF16")."""
  dt = np.dtype(dtype)
  if dt not in NAMES:
    raise CheckpointError(f"dtype {dt} has no safetensors name here; cast to one of"
                          f" {', '.join(str(d) for d in NAMES)} first")
  return NAMES[dt]


def is_floating(dtype: Any) -> bool:
  """Whether a numpy dtype is one of the safetensors floating dtypes (bfloat16 included)."""
  return NAMES.get(np.dtype(dtype)) in FLOATING


def _roots(folder: pathlib.Path) -> list[pathlib.Path]:
  """Where the files of ``folder`` may lie: the folder itself, and for a Hugging Face hub
  cache snapshot (``models--ORG--NAME/snapshots/REV/``, whose files link to
  ``../../blobs/``) that repository's blobs."""
  root = folder.resolve()
  roots = [root]
  blobs = root.parent.parent / "blobs"
  if root.parent.name == "snapshots" and blobs.is_dir():
    roots.append(blobs.resolve())
  return roots


def inside(folder: str | os.PathLike, name: Any, asker: str | os.PathLike) -> pathlib.Path:
  """``folder / name``, refused unless it stays inside ``folder`` once symlinks are resolved.

  Nothing is opened: the name is checked as text (relative, no ``..``, no backslash
  or NUL), then its resolved path against the folder's (see ``_roots``).

  Args:
    folder: the model folder.
    name: a file name read from ``asker`` (or listed in the folder).
    asker: the file (or folder, for a listing) that names it, for the message.

  Raises:
    CheckpointError: the name is not a relative path inside the folder.
  """
  folder = pathlib.Path(folder)
  fix = (f"keep the model's files inside its folder (no absolute or '..' names, no links out of"
         f" it): fix {asker}, or download the checkpoint again into a folder of its own")
  if (not isinstance(name, str) or not name or "\0" in name or "\\" in name
      or pathlib.PurePosixPath(name).is_absolute() or ".." in pathlib.PurePosixPath(name).parts):
    raise CheckpointError(f"{asker} names {name!r}, which is not a file name inside {folder};"
                          f" {fix}")
  try:
    target = (folder / name).resolve()
    roots = _roots(folder)
  except (OSError, RuntimeError) as e:  # a symlink loop
    raise CheckpointError(f"{asker} names {name!r}, whose path cannot be resolved ({e}); {fix}"
                          ) from None
  if not any(target == r or target.is_relative_to(r) for r in roots):
    raise CheckpointError(f"{asker} names {name!r}, which resolves to {target}, outside {folder};"
                          f" {fix}")
  return folder / name


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lies: ``begin``/``end`` are absolute byte offsets in ``path``."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int
  path: pathlib.Path

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r}")
    out[key] = value
  return out


def _nonneg_ints(value: Any) -> tuple[int, ...] | None:
  if not isinstance(value, list) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    return None
  return tuple(value)


def _parse(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """(tensors, __metadata__) of one file, validated against its size."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path} not found; download the checkpoint again")
  size = path.stat().st_size
  again = "download it again"
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path} is truncated: {size} bytes, the header needs 8; {again}")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
      raise CheckpointError(f"{path} is not safetensors: its header claims {n} bytes (over the"
                            f" {MAX_HEADER_BYTES} limit); {again}")
    if 8 + n > size:
      raise CheckpointError(f"{path} is truncated: {size} bytes, the header needs {8 + n}; {again}")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path} has a header that is not JSON (not UTF-8: byte"
                          f" {raw[e.start]:#04x} at header offset {e.start}); the file is garbled"
                          f" or not safetensors: {again}") from None
  except ValueError as e:  # JSONDecodeError, duplicate keys
    raise CheckpointError(f"{path} has a header that is not JSON ({e}); {again}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} has a header that is not a JSON object; {again}")
  metadata = header.pop("__metadata__", None)
  metadata = {} if metadata is None else metadata
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{path} has a __metadata__ that is not a JSON object; {again}")
  base, out = 8 + n, {}
  for name, spec in header.items():
    if not isinstance(spec, dict):
      raise CheckpointError(f"{path}: tensor {name!r} has no dtype/shape/data_offsets; {again}")
    kind = spec.get("dtype")
    if kind not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {kind!r}; dlm reads"
                            f" {', '.join(DTYPES)}: convert the checkpoint to one of them")
    shape, offsets = _nonneg_ints(spec.get("shape")), _nonneg_ints(spec.get("data_offsets"))
    if shape is None or offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
      raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {spec.get('shape')}"
                            f" or data_offsets {spec.get('data_offsets')}; {again}")
    dtype, (begin, end) = DTYPES[kind], offsets
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
      raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but shape"
                            f" {list(shape)} of {kind} needs {need}; the file is damaged: {again}")
    out[name] = TensorInfo(name, dtype, shape, base + begin, base + end, path)
  spans = sorted((i.begin, i.end, i.name) for i in out.values() if i.nbytes)
  for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
    if begin1 < end0:
      raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap; the file is damaged:"
                            f" {again}")
  needed = max([base] + [e for _, e, _ in spans])
  if size < needed:
    raise CheckpointError(f"{path} is truncated: {size} bytes, the header needs {needed}; {again}")
  return out, metadata


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """The tensors of one file by name (file order), validated; a truncated file is an error."""
  return _parse(path)[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The ``__metadata__`` of one file ({} when it has none)."""
  return _parse(path)[1]


class SafetensorsFolder:
  """The tensors of a checkpoint folder (sharded with an index, or every *.safetensors) or file.

  Attributes:
    path: what it was opened on.
    files: the safetensors files, in order.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = path = pathlib.Path(path)
    if path.is_file():
      self.files = [path]
      self._infos = read_header(path)
    elif (path / INDEX).is_file():
      self._open_index(inside(path, INDEX, path))
    elif path.is_dir():
      self.files = [inside(path, f.name, path) for f in sorted(path.glob("*.safetensors"))]
      if not self.files:
        raise CheckpointError(f"no *.safetensors in {path}; download the model's weights"
                              " (model.safetensors or its shards and index) there")
      self._infos = {}
      for f in self.files:
        for name, info in read_header(f).items():
          if name in self._infos:
            raise CheckpointError(f"tensor {name!r} is in both {self._infos[name].path.name} and"
                                  f" {f.name} in {path}; remove the stale file")
          self._infos[name] = info
    else:
      raise CheckpointError(f"{path} not found; pass a checkpoint folder or a .safetensors file")
    order = {f: i for i, f in enumerate(self.files)}
    self._infos = dict(sorted(self._infos.items(),
                              key=lambda kv: (order[kv[1].path], kv[1].begin, kv[0])))

  def _open_index(self, index: pathlib.Path) -> None:
    """Reads the index; every shard name is checked to lie in the folder before any is opened."""
    weight_map = _read_index(index)
    shards = list(dict.fromkeys(weight_map.values()))
    paths = {shard: inside(index.parent, shard, index) for shard in shards}
    for shard, shard_path in paths.items():
      if not shard_path.is_file():
        raise CheckpointError(f"{index} names {shard}, which is missing from {index.parent};"
                              " download that shard")
    self.files = [paths[s] for s in sorted(shards)]
    headers = {s: read_header(paths[s]) for s in shards}
    self._infos = {}
    for name, shard in weight_map.items():
      if name not in headers[shard]:
        raise CheckpointError(f"{index} puts tensor {name!r} in {shard}, which does not hold it;"
                              " download the checkpoint again")
      self._infos[name] = headers[shard][name]

  def __contains__(self, name: str) -> bool:
    return name in self._infos

  def __len__(self) -> int:
    return len(self._infos)

  def names(self) -> list[str]:
    """Every tensor name, shard by shard in file order (the order that reads sequentially)."""
    return list(self._infos)

  def info(self, name: str) -> TensorInfo:
    if name not in self._infos:
      raise CheckpointError(f"tensor {name!r} is not in {self.path}; the checkpoint is incomplete"
                            " or of another model")
    return self._infos[name]

  def shard_of(self, name: str) -> pathlib.Path:
    return self.info(name).path

  def names_by_shard(self) -> dict[pathlib.Path, list[str]]:
    """{shard path: its tensor names in file order}, shards in ``files`` order."""
    out: dict[pathlib.Path, list[str]] = {f: [] for f in self.files}
    for info in self._infos.values():
      out[info.path].append(info.name)
    return {f: names for f, names in out.items() if names}

  def total_bytes(self) -> int:
    return sum(i.nbytes for i in self._infos.values())

  def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
    """Reads tensor ``name`` straight into ``out`` (C-contiguous, its shape/dtype); returns it."""
    info = self.info(name)
    if (not isinstance(out, np.ndarray) or out.shape != info.shape or out.dtype != info.dtype
        or not out.flags.c_contiguous or not out.flags.writeable):
      got = (f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
      raise ValueError(f"read_into({name!r}) needs a writeable C-contiguous {info.dtype}"
                       f" {info.shape} array, got {got}")
    if not info.nbytes:
      return out
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(info.path, "rb", buffering=0) as f:
      f.seek(info.begin)
      done = 0
      while done < info.nbytes:  # one read(2) returns at most ~2 GiB on Linux
        got = f.readinto(view[done:])
        if not got:
          raise CheckpointError(f"{info.path} ended while reading {name!r} (it shrank after it"
                                " was opened); download it again")
        done += got
    return out

  def read(self, name: str) -> np.ndarray:
    """Tensor ``name`` as a fresh array (only its own bytes are read)."""
    info = self.info(name)
    return self.read_into(name, np.empty(info.shape, info.dtype))


def _read_index(index: pathlib.Path) -> dict[str, str]:
  """The ``weight_map`` {tensor: shard file name} of an index file, validated as data."""
  size = index.stat().st_size
  if size > MAX_INDEX_BYTES:
    raise CheckpointError(f"{index} is {size} bytes, over the {MAX_INDEX_BYTES} limit of a"
                          " safetensors index; download it again")
  try:
    weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
      raise ValueError("weight_map is not {tensor: file}")
  except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e});"
                          " download it again") from None
  return weight_map


Spec = tuple[str, Sequence[int], Any]


def _layout(shard: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str] | None
            ) -> tuple[bytes, list[tuple[str, tuple[int, ...], np.dtype]]]:
  """(8-byte length + space-padded JSON header, specs in data order).

  Within a shard, tensors are laid out by decreasing itemsize (stable), as the
  reference writer does, so every tensor starts at a multiple of its itemsize.
  """
  order = sorted(shard, key=lambda s: -s[2].itemsize)
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, shape, dtype in order:
    n = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw, order


def _check_specs(specs: Iterable[Spec]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  out, seen = [], set()
  for name, shape, dtype in specs:
    shape = tuple(int(d) for d in shape)
    name_of(dtype)
    if not isinstance(name, str) or name == "__metadata__" or name in seen:
      raise CheckpointError(f"tensor name {name!r} is reserved or repeated; give each tensor a"
                            " unique name")
    if any(d < 0 for d in shape):
      raise CheckpointError(f"tensor {name!r} has a negative dimension in {list(shape)}")
    seen.add(name)
    out.append((name, shape, np.dtype(dtype)))
  return out


def write_folder(out_dir: str | os.PathLike, specs: Iterable[Spec],
                 get: Callable[[str], np.ndarray], *, max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None) -> list[pathlib.Path]:
  """Writes the tensors as Hugging Face style safetensors into a new or empty folder.

  One ``model.safetensors`` when everything fits in ``max_shard_bytes``, else
  ``model-0000i-of-0000K.safetensors`` shards (split in ``specs`` order; a
  tensor larger than the limit gets a shard of its own) plus
  ``model.safetensors.index.json``.  Files are written under ``*.tmp`` names
  and renamed when all are complete (removed on error).

  Args:
    out_dir: the folder; created if missing, refused if not empty.
    specs: (name, shape, dtype) of every tensor, known up front since each
      file's header comes before its data.
    get: produces one tensor by name, called once per tensor as its turn comes,
      so only one tensor is held here at a time.
    max_shard_bytes: the most tensor bytes per file.
    metadata: the ``__metadata__`` of every file (transformers expects
      {"format": "pt"}); None writes none.

  Returns:
    The safetensors files written, in order.

  Raises:
    CheckpointError: ``out_dir`` not empty, an unsupported dtype or repeated name.
    ValueError: ``get`` returned an array of another shape or dtype than declared.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise CheckpointError(f"{out_dir} is not an empty folder; safetensors are never written over"
                          " existing files: pick a new folder")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                      for k, v in metadata.items()):
    raise ValueError(f"metadata must be {{str: str}}, got {metadata!r}")
  specs = _check_specs(specs)
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
  names = [SINGLE] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
  out_dir.mkdir(parents=True, exist_ok=True)
  tmps = [out_dir / (f + ".tmp") for f in names] + ([out_dir / (INDEX + ".tmp")] if k > 1 else [])
  try:
    for tmp, shard in zip(tmps, shards):
      _write_file(tmp, shard, get, metadata)
    if k > 1:
      weight_map = {n: f for f, shard in zip(names, shards) for n, _, _ in shard}
      total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
      tmps[-1].write_text(json.dumps({"metadata": {"total_size": total},
                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    for tmp, name in zip(tmps, names + [INDEX]):
      os.replace(tmp, out_dir / name)
  except BaseException:
    for tmp in tmps:
      tmp.unlink(missing_ok=True)
    raise
  return [out_dir / f for f in names]


def _write_file(path: pathlib.Path, shard: list[tuple[str, tuple[int, ...], np.dtype]],
                get: Callable[[str], np.ndarray], metadata: dict[str, str] | None) -> None:
  header, order = _layout(shard, metadata)
  with path.open("wb") as f:
    f.write(header)
    for name, shape, dtype in order:
      arr = np.asarray(get(name))
      if arr.shape != shape or arr.dtype != dtype:
        raise ValueError(f"get({name!r}) returned {arr.dtype} {list(arr.shape)}, but it was"
                         f" declared {dtype} {list(shape)}")
      arr = np.ascontiguousarray(arr)
      if arr.size:
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
      del arr
    expected = len(header) + sum(math.prod(s) * d.itemsize for _, s, d in order)
    if f.tell() != expected:
      raise OSError(f"{path}: wrote {f.tell()} bytes, expected {expected}")
