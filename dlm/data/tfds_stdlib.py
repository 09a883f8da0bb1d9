"""The embedded standard-library corpus as a local TFDS dataset (ArrayRecord).

``DlmStdlib`` (TFDS name ``dlm_stdlib``) is a ``GeneratorBasedBuilder`` that
downloads nothing: ``_split_generators`` walks this interpreter's stdlib
``.py`` files (the same files and the same crc32 train/validation rule as
``corpora.py``) and yields ``{"text": file_text}``. It is prepared once to
ArrayRecord (``download_and_prepare(file_format="array_record")``), which
works without TensorFlow installed, and cached under a data_dir (default
``~/.cache/dlm/tfds``, or ``$DLM_TFDS_DIR``). Then it is read like any TFDS
dataset::

  data_dir = prepare_stdlib_tfds()
  ds = tfds.data_source("dlm_stdlib", split="train", data_dir=data_dir)
  ds[0]["text"]  # bytes (UTF-8)

The builder config name records the Python version and the split threshold
(e.g. ``dlm_stdlib/py311_vp50``) so a cache made by another interpreter or
rule is never reused; ``dlm_stdlib`` alone means this interpreter's default.
Files that are not valid UTF-8 are left out, as in ``corpora.load_corpus``.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import sys
from typing import Any, Iterator

from etils import epath
import tensorflow_datasets as tfds

from dlm.data import corpora

NAME = "dlm_stdlib"
DEFAULT_DATA_DIR = "~/.cache/dlm/tfds"
DATA_DIR_ENV = "DLM_TFDS_DIR"


def local_code_path(cls: type[Any]) -> epath.Path | None:
  """The builder's source file, found without ``importlib_resources``.

  TFDS 4.9.10's default ``code_path`` touches ``importlib_resources`` (a pip
  backport not installed here) for builders defined in a package module, and
  fails with ModuleNotFoundError; builders override it with this.
  """
  try:
    return epath.Path(inspect.getfile(cls))
  except (TypeError, OSError):
    return None


def config_name(val_permille: int = corpora.DEFAULT_VAL_PERMILLE) -> str:
  """The builder config name for this interpreter and split threshold."""
  return f"py{sys.version_info.major}{sys.version_info.minor}_vp{val_permille}"


class DlmStdlibConfig(tfds.core.BuilderConfig):
  """Which split threshold (and, via the name, which Python) to build."""

  def __init__(self, *, val_permille: int = corpora.DEFAULT_VAL_PERMILLE,
               **kwargs: Any):
    super().__init__(name=config_name(val_permille), **kwargs)
    self.val_permille = val_permille


class DlmStdlib(tfds.core.GeneratorBasedBuilder):
  """Python standard library ``.py`` sources, one document per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stdlib .py files split by crc32 of the path."}
  BUILDER_CONFIGS = [DlmStdlibConfig()]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    return local_code_path(cls)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Python standard library .py sources (no site-packages"
                     " or tests), one document per file."),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    del dl_manager  # Nothing to download: the corpus is on this machine.
    root = corpora.stdlib_root()
    return {
        "train": self._generate_examples(root, val=False),
        "validation": self._generate_examples(root, val=True),
    }

  def _generate_examples(self, root: pathlib.Path, val: bool
                         ) -> Iterator[tuple[str, dict[str, str]]]:
    val_permille = self.builder_config.val_permille
    for path in corpora.python_files(root):
      rel = path.relative_to(root).as_posix()
      if corpora.is_val(rel, val_permille) != val:
        continue
      try:
        text = path.read_bytes().decode("utf-8")
      except UnicodeDecodeError:
        continue
      yield rel, {"text": text, "path": rel}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> str:
  """``data_dir``, else ``$DLM_TFDS_DIR``, else ``~/.cache/dlm/tfds``."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def prepare_stdlib_tfds(data_dir: str | os.PathLike[str] | None = None, *,
                        val_permille: int = corpora.DEFAULT_VAL_PERMILLE
                        ) -> str:
  """Builds ``dlm_stdlib`` to ArrayRecord under data_dir once; returns it.

  A second call finds the prepared dataset and only reads its metadata.
  """
  data_dir = resolve_data_dir(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  name = config_name(val_permille)
  known = {c.name for c in DlmStdlib.BUILDER_CONFIGS}
  config = name if name in known else DlmStdlibConfig(val_permille=val_permille)
  builder = DlmStdlib(data_dir=data_dir, config=config,
                      file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False))
  return data_dir
