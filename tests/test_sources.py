"""Tests for dlm.data.sources and dlm.data.tfds_stdlib (data in tmp dirs)."""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import pickle
from typing import Any, Iterator

from array_record.python import array_record_module
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dlm.data import corpora
from dlm.data import sources
from dlm.data import tfds_stdlib

DOCS = ["first document\nwith two lines", "second: héllo wörld ✓", "3",
        "  leading space and trailing newline\n"]
BAD = b"bad \xff\xfe bytes"


def _files_cfg(train_glob: str, **kwargs: Any) -> dict[str, Any]:
  files = {"train_glob": train_glob, "val_glob": train_glob}
  files.update(kwargs.pop("files", {}))
  return {"source": "files", "files": files, **kwargs}


def _write_text(tmp: pathlib.Path, docs: list[str]) -> None:
  for i, doc in enumerate(docs):
    (tmp / f"doc{i:03d}.txt").write_bytes(doc.encode("utf-8"))


def _write_jsonl(path: pathlib.Path, docs: list[str],
                 field: str = "text") -> None:
  lines = [json.dumps({field: d, "id": i}, ensure_ascii=i % 2 == 0)
           for i, d in enumerate(docs)]
  path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")


def _write_array_record(path: pathlib.Path, records: list[bytes]) -> None:
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def _error(cfg: Any, split: str = "train") -> str:
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    sources.make_source(cfg, split)
  message = str(info.value)
  assert "\n" not in message, message
  return message


# ------------------------------------------------------------- round trips --

def test_text_files_round_trip(tmp_path):
  _write_text(tmp_path, DOCS)
  ds = sources.make_source(_files_cfg(str(tmp_path / "*.txt")), "train")
  assert list(sources.iter_documents(ds)) == DOCS
  assert sources.source_stats(ds).documents == len(DOCS)
  assert sources.source_stats(ds).skipped == 0


def test_text_format_override_and_configdict(tmp_path):
  (tmp_path / "a.dat").write_text("alpha", encoding="utf-8")
  (tmp_path / "b.dat").write_text("beta", encoding="utf-8")
  cfg = ml_collections.ConfigDict(
      _files_cfg(str(tmp_path / "*.dat"), files={"format": "text"}))
  ds = sources.make_source(cfg, "validation")
  assert list(sources.iter_documents(ds)) == ["alpha", "beta"]


def test_jsonl_round_trip(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
  _write_jsonl(tmp_path / "b.jsonl", DOCS[2:])
  ds = sources.make_source(_files_cfg(str(tmp_path / "*.jsonl")), "train")
  assert list(sources.iter_documents(ds)) == DOCS


def test_jsonl_custom_field(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", DOCS, field="content")
  cfg = _files_cfg(str(tmp_path / "a.jsonl"), files={"jsonl_field": "content"})
  assert list(sources.iter_documents(sources.make_source(cfg, "train"))) == DOCS


def test_array_record_round_trip(tmp_path):
  _write_array_record(tmp_path / "a.array_record",
                      [d.encode("utf-8") for d in DOCS[:3]])
  _write_array_record(tmp_path / "b.array_record",
                      [d.encode("utf-8") for d in DOCS[3:]])
  ds = sources.make_source(_files_cfg(str(tmp_path / "*.array_record")),
                           "train")
  assert list(sources.iter_documents(ds)) == DOCS
  assert ds[3] == DOCS[3]


def test_mixed_formats_in_one_glob_and_pickle(tmp_path):
  _write_text(tmp_path, DOCS[:1])
  _write_jsonl(tmp_path / "b.jsonl", DOCS[1:2])
  _write_array_record(tmp_path / "c.array_record", [DOCS[2].encode("utf-8")])
  ds = sources.make_source(_files_cfg(str(tmp_path / "*")), "train")
  assert sorted(sources.iter_documents(ds)) == sorted(DOCS[:3])
  again = pickle.loads(pickle.dumps(ds))
  assert list(sources.iter_documents(again)) == list(
      sources.iter_documents(ds))


def test_grain_pipeline_over_source(tmp_path):
  _write_text(tmp_path, DOCS)
  ds = sources.make_source(_files_cfg(str(tmp_path / "*.txt")), "train")
  lengths = ds.map(len).filter(lambda n: n > 1)
  assert [n for n in lengths.to_iter_dataset()] == [
      len(d) for d in DOCS if len(d) > 1]


def test_stdlib_source_matches_corpus(tmp_path):
  for i in range(40):
    (tmp_path / f"m{i}.py").write_text(f"x = {i}\n", encoding="utf-8")
  cfg = {"source": "stdlib", "root": str(tmp_path), "val_permille": 200}
  corpus = corpora.load_corpus("stdlib", root=tmp_path, val_permille=200)
  assert list(sources.iter_documents(
      sources.make_source(cfg, "train"))) == corpus.train
  assert list(sources.iter_documents(
      sources.make_source(cfg, "validation"))) == corpus.val


# ------------------------------------------------------------------- tfds --

class TinyTextsForTest(tfds.core.GeneratorBasedBuilder):
  """20 short texts, 16 train and 4 validation; an extra int feature."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return tfds_stdlib.local_code_path(cls)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "body": tfds.features.Text(),
            "n": tfds.features.Scalar(dtype=np.int64),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(False),
            "validation": self._generate_examples(True)}

  def _generate_examples(self, val: bool) -> Iterator[tuple[int, dict]]:
    for i in range(20):
      if (i % 5 == 0) == val:
        yield i, {"body": f"text number {i} ✓", "n": i}


def _tiny_texts(tmp_path: pathlib.Path) -> dict[str, Any]:
  data_dir = tmp_path / "tfds"
  TinyTextsForTest(data_dir=str(data_dir),
                   file_format="array_record").download_and_prepare()
  return {"source": "tfds",
          "tfds": {"name": "tiny_texts_for_test", "data_dir": str(data_dir),
                   "text_field": "body"}}


def test_tfds_round_trip(tmp_path):
  cfg = _tiny_texts(tmp_path)
  train = sorted(sources.iter_documents(sources.make_source(cfg, "train")))
  val = sorted(sources.iter_documents(sources.make_source(cfg, "validation")))
  assert train == sorted(f"text number {i} ✓" for i in range(20) if i % 5)
  assert val == sorted(f"text number {i} ✓" for i in range(0, 20, 5))
  # A split mapping, and a scan (reads each record once).
  cfg["tfds"]["splits"] = {"validation": "train"}
  cfg["scan"] = True
  ds = sources.make_source(cfg, "validation")
  assert sorted(sources.iter_documents(ds)) == train


def test_tfds_errors(tmp_path):
  cfg = _tiny_texts(tmp_path)
  cfg["tfds"]["text_field"] = "text"
  message = _error(cfg)
  assert "tiny_texts_for_test" in message and "'text'" in message
  assert "config.data.tfds.text_field" in message
  cfg["tfds"]["text_field"] = "body"
  cfg["tfds"]["name"] = "no_such_dataset_xyz"
  message = _error(cfg)
  assert "no_such_dataset_xyz" in message and "file_format=array_record" in (
      message)
  cfg["tfds"]["name"] = "tiny_texts_for_test"
  cfg["tfds"]["splits"] = {"train": "test"}
  message = _error(cfg)
  assert "'test'" in message and "config.data.tfds.splits" in message
  empty_dir = tmp_path / "empty_tfds"
  empty_dir.mkdir()
  cfg["tfds"]["data_dir"] = str(empty_dir)
  message = _error(cfg)
  assert "not prepared under" in message and str(empty_dir) in message
  cfg["tfds"]["data_dir"] = str(tmp_path / "missing")
  message = _error(cfg)
  assert "missing" in message and "tfds build" in message


def test_tfds_stdlib_builder_matches_corpus(tmp_path):
  data_dir = tfds_stdlib.prepare_stdlib_tfds(tmp_path / "cache")
  assert data_dir == str(tmp_path / "cache")
  assert tfds_stdlib.prepare_stdlib_tfds(data_dir) == data_dir  # cached
  corpus = corpora.load_corpus("stdlib")
  cfg = {"source": "tfds", "tfds": {"name": "dlm_stdlib",
                                    "data_dir": data_dir}}
  val = sources.make_source(cfg, "validation")
  assert sorted(sources.iter_documents(val)) == sorted(corpus.val)
  assert len(sources.make_source(cfg, "train")) == len(corpus.train)


# ---------------------------------------------------------------- mixture --

def test_mixture_weights(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  _write_jsonl(tmp_path / "a" / "a.jsonl", [f"a{i}" for i in range(300)])
  _write_jsonl(tmp_path / "b" / "b.jsonl", [f"b{i}" for i in range(300)])
  cfg = {"source": "mixture", "mixture": [
      {**_files_cfg(str(tmp_path / "a" / "*.jsonl")), "weight": 3.0},
      {**_files_cfg(str(tmp_path / "b" / "*.jsonl")), "weight": 1.0},
  ]}
  ds = sources.make_source(ml_collections.ConfigDict(cfg), "train")
  counts = collections.Counter(doc[0] for doc in sources.iter_documents(ds))
  total = counts["a"] + counts["b"]
  assert total == len(ds) >= 300
  assert abs(counts["a"] / total - 0.75) < 0.02
  stats = sources.source_stats(ds)
  assert [c.documents for c in stats.children] == [300, 300]


def test_mixture_bad_weight(tmp_path):
  _write_text(tmp_path, DOCS)
  cfg = {"source": "mixture", "mixture": [
      {**_files_cfg(str(tmp_path / "*.txt")), "weight": 0}]}
  assert "mixture[0].weight" in _error(cfg)


# ------------------------------------------------------------- bad inputs --

def test_glob_matches_nothing(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  message = _error(_files_cfg(pattern))
  assert message == (f"no files match {pattern}; fix"
                     " config.data.files.train_glob")
  assert "config.data.files.val_glob" in _error(_files_cfg(pattern),
                                                "validation")


def test_empty_source(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
  message = _error(_files_cfg(str(tmp_path / "*.jsonl")))
  assert "empty.jsonl" in message and "no documents" in message
  _write_array_record(tmp_path / "empty.array_record", [])
  message = _error(_files_cfg(str(tmp_path / "*.array_record")))
  assert "empty.array_record" in message and "no documents" in message


@pytest.mark.parametrize("fmt", ["text", "jsonl", "array_record"])
def test_invalid_utf8_fail(tmp_path, fmt):
  if fmt == "text":
    _write_text(tmp_path, DOCS)
    (tmp_path / "doc999.txt").write_bytes(BAD)
    bad_name, pattern = "doc999.txt", "*.txt"
  elif fmt == "jsonl":
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, DOCS)
    path.write_bytes(path.read_bytes() + b'{"text": "' + BAD + b'"}\n')
    bad_name, pattern = "bad.jsonl:8", "*.jsonl"
  else:
    _write_array_record(tmp_path / "bad.array_record",
                        [b"fine", BAD, b"also fine"])
    bad_name, pattern = "bad.array_record record 1", "*.array_record"
  message = _error(_files_cfg(str(tmp_path / pattern), invalid_utf8="fail"))
  assert bad_name in message and "invalid_utf8='skip'" in message


@pytest.mark.parametrize("fmt", ["text", "jsonl", "array_record"])
def test_invalid_utf8_skip_counts(tmp_path, fmt, caplog):
  if fmt == "text":
    _write_text(tmp_path, DOCS)
    (tmp_path / "doc997.txt").write_bytes(BAD)
    (tmp_path / "doc998.txt").write_bytes(BAD)
    first, pattern = "doc997.txt", "*.txt"
  elif fmt == "jsonl":
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "' + BAD + b'"}\n' + b'{"text": "ok"}\n'
                     + b'{"text": "' + BAD + b'"}\n')
    first, pattern = "bad.jsonl:1", "*.jsonl"
  else:
    _write_array_record(tmp_path / "bad.array_record",
                        [BAD, b"ok", BAD])
    first, pattern = "bad.array_record record 0", "*.array_record"
  with caplog.at_level(logging.WARNING, logger="dlm.data.sources"):
    ds = sources.make_source(
        _files_cfg(str(tmp_path / pattern), invalid_utf8="skip"), "train")
  stats = sources.source_stats(ds)
  assert stats.skipped == 2
  assert first in stats.first_skipped
  kept = list(sources.iter_documents(ds))
  assert kept == (DOCS if fmt == "text" else ["ok"])
  assert stats.documents == len(kept)
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 1 and "skipped 2" in warnings[0]
  assert first in warnings[0]


def test_skip_without_scan_is_an_error(tmp_path):
  _write_text(tmp_path, DOCS)
  cfg = _files_cfg(str(tmp_path / "*.txt"), invalid_utf8="skip", scan=False)
  assert "scan" in _error(cfg)


def test_lazy_fail_without_scan(tmp_path):
  _write_text(tmp_path, DOCS[:1])
  (tmp_path / "doc999.txt").write_bytes(BAD)
  ds = sources.make_source(_files_cfg(str(tmp_path / "*.txt"), scan=False),
                           "train")
  assert ds[0] == DOCS[0]
  with pytest.raises(ValueError, match="doc999.txt is not valid UTF-8"):
    ds[1]  # pylint: disable=pointless-statement


def test_jsonl_not_json(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
  message = _error(_files_cfg(str(path)))
  assert f"{path}:2 is not valid JSON" in message


def test_jsonl_missing_field(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "ok"}\n\n{"body": "no text"}\n', encoding="utf-8")
  message = _error(_files_cfg(str(path)))
  assert message == (f"{path}:3 has no field 'text'; set"
                     " config.data.files.jsonl_field")


def test_bad_config_values(tmp_path):
  _write_text(tmp_path, DOCS)
  assert "invalid_utf8" in _error(
      _files_cfg(str(tmp_path / "*.txt"), invalid_utf8="ignore"))
  assert "config.data.source" in _error({"source": "web"})
  assert "config.data.files.format" in _error(
      _files_cfg(str(tmp_path / "*.txt"), files={"format": "csv"}))
  with pytest.raises(ValueError, match="unknown split"):
    sources.make_source({"source": "stdlib"}, "test")
