"""Tests for dlm.data.pipeline."""

from __future__ import annotations

import json
import math
import pathlib

import ml_collections
import numpy as np
import pytest

from dlm.data import corpora
from dlm.data import pipeline
from dlm.data import tokenizer as tokenizer_lib


def _make_root(root: pathlib.Path, max_bytes: int = 150_000) -> pathlib.Path:
  """Copies a slice of the real stdlib into ``root`` under new names."""
  total = 0
  for i, path in enumerate(corpora.stdlib_files()):
    data = path.read_bytes()
    if len(data) > 20_000:
      continue
    dest = root / f"pkg{i % 5}" / f"m{i}.py"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    total += len(data)
    if total >= max_bytes:
      break
  return root


def _cfg(root: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="stdlib", root=str(root), vocab_size=350, seq_len=64,
             val_permille=200, tokenizer_max_chars=200_000)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
  return _make_root(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def prepared(root, workdir) -> pipeline.PreparedData:
  return pipeline.prepare(_cfg(root), workdir)


def test_prepare_shapes_and_files(prepared, workdir):
  assert prepared.train_rows.dtype == np.int32
  assert prepared.train_rows.shape[1] == prepared.val_rows.shape[1] == 64
  assert prepared.train_rows.shape[0] > 100 and prepared.val_rows.shape[0] > 5
  assert (workdir / "tokenizer.model").is_file()
  meta = json.loads((workdir / "data" / "meta.json").read_text())
  assert meta["vocab_size"] == 350
  assert meta["train_tokens"] == np.load(workdir / "data" / "train.npy").size
  assert prepared.meta["val_files"] > 0 and not prepared.meta["cache_hit"]
  assert not list(workdir.rglob(".*"))  # No temp files left behind.


def test_rows_decode_to_source_documents(prepared, root):
  corpus = corpora.load_corpus(root=root, val_permille=200)
  tok = prepared.tokenizer
  for rows, docs in ((prepared.train_rows, corpus.train),
                     (prepared.val_rows, corpus.val)):
    flat = rows.reshape(-1)
    ends = np.flatnonzero(flat == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert len(ends) > 0
    for k, (s, e) in enumerate(zip(starts, ends)):
      assert tok.decode(flat[s:e]) == docs[k]
    # The dropped remainder is shorter than one row.
    full = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    assert full - flat.size < rows.shape[1]
    assert flat.size % rows.shape[1] == 0


def test_full_streams_hold_every_document(prepared, root, workdir):
  corpus = corpora.load_corpus(root=root, val_permille=200)
  tok = prepared.tokenizer
  for name, docs in (("train", corpus.train), ("val", corpus.val)):
    stream = np.load(workdir / "data" / f"{name}.npy")
    assert stream[-1] == tok.eos_id
    assert int(np.sum(stream == tok.eos_id)) == len(docs)
    pieces = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]
    assert [tok.decode(p) for p in pieces] == docs


def test_cache_reuse_does_not_retrain(prepared, root, workdir, monkeypatch):
  model_bytes = (workdir / "tokenizer.model").read_bytes()

  def boom(*args, **kwargs):
    raise AssertionError("must not retrain or re-tokenize")

  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", boom)
  monkeypatch.setattr(pipeline, "_build_streams", boom)
  again = pipeline.prepare(_cfg(root), workdir)
  assert again.meta["cache_hit"]
  np.testing.assert_array_equal(again.train_rows, prepared.train_rows)
  np.testing.assert_array_equal(again.val_rows, prepared.val_rows)
  assert (workdir / "tokenizer.model").read_bytes() == model_bytes


def test_seq_len_change_reuses_streams(prepared, root, workdir, monkeypatch):
  monkeypatch.setattr(pipeline, "_build_streams", None)  # Must not be called.
  again = pipeline.prepare(_cfg(root, seq_len=32), workdir)
  assert again.train_rows.shape[1] == 32
  np.testing.assert_array_equal(again.train_rows.reshape(-1)[:640],
                                prepared.train_rows.reshape(-1)[:640])


def test_config_change_rebuilds_cache(root, tmp_path):
  first = pipeline.prepare(_cfg(root), tmp_path)
  second = pipeline.prepare(_cfg(root, val_permille=300), tmp_path)
  assert not second.meta["cache_hit"]
  assert second.meta["val_files"] > first.meta["val_files"]


def test_vocab_mismatch_with_existing_tokenizer(prepared, root, workdir):
  with pytest.raises(ValueError, match="fresh workdir"):
    pipeline.prepare(_cfg(root, vocab_size=400), workdir)


def test_missing_config_field(root, tmp_path):
  cfg = _cfg(root)
  del cfg["seq_len"]
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.prepare(cfg, tmp_path)


def _numbered_rows(n: int, length: int = 3) -> np.ndarray:
  return np.repeat(np.arange(n, dtype=np.int32)[:, None], length, axis=1)


def test_two_processes_cover_each_row_once_per_epoch():
  rows = _numbered_rows(37)
  batch_size, seen = 3, []
  for process_index in range(2):
    it = pipeline.train_iterator(rows, batch_size=batch_size, seed=7,
                                 process_index=process_index, process_count=2)
    for _ in range(37 // (2 * batch_size)):  # the global batches inside epoch 1
      batch = next(it)["tokens"]
      assert batch.shape == (batch_size, 3) and batch.dtype == np.int32
      seen.extend(batch[:, 0].tolist())
  assert len(seen) == len(set(seen)) == 36
  assert set(seen) <= set(range(37))


def test_global_batches_do_not_depend_on_process_count():
  rows = _numbered_rows(50)
  one = pipeline.train_iterator(rows, batch_size=8, seed=3)
  parts = [pipeline.train_iterator(rows, batch_size=2, seed=3, process_index=p,
                                   process_count=4) for p in range(4)]
  for _ in range(12):  # crosses epoch boundaries
    glob = np.concatenate([next(it)["tokens"] for it in parts])
    np.testing.assert_array_equal(glob, next(one)["tokens"])


def test_epochs_are_reshuffled():
  rows = _numbered_rows(20)
  it = pipeline.train_iterator(rows, batch_size=4, seed=0)
  order = np.concatenate([next(it)["tokens"][:, 0] for _ in range(10)])
  first, second = order[:20], order[20:]
  assert sorted(first) == sorted(second) == list(range(20))
  assert not np.array_equal(first, second)


def test_seed_changes_order():
  rows = _numbered_rows(20)
  a = next(pipeline.train_iterator(rows, batch_size=8, seed=0))["tokens"]
  b = next(pipeline.train_iterator(rows, batch_size=8, seed=1))["tokens"]
  assert not np.array_equal(a, b)


def test_restore_state_mid_epoch():
  rows = _numbered_rows(23)
  kwargs = dict(batch_size=4, seed=3, process_index=1, process_count=2)
  it = pipeline.train_iterator(rows, **kwargs)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["tokens"] for _ in range(7)]  # Crosses epochs.
  restored = pipeline.train_iterator(rows, **kwargs)
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(restored)["tokens"], want)


def test_train_iterator_errors():
  rows = _numbered_rows(10)
  with pytest.raises(ValueError, match="batch"):
    pipeline.train_iterator(rows, batch_size=6, seed=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.train_iterator(rows, batch_size=1, seed=0, process_index=2,
                            process_count=2)


def test_eval_batches_cover_rows_in_order():
  rows = _numbered_rows(5) + 1
  batches = list(pipeline.eval_batches(rows, batch_size=2))
  assert len(batches) == 3 == pipeline.num_eval_batches(5, batch_size=2)
  tokens = np.concatenate([b["tokens"] for b in batches])
  mask = np.concatenate([b["loss_mask"] for b in batches])
  np.testing.assert_array_equal(tokens[:5], rows)
  np.testing.assert_array_equal(tokens[5], 0)
  assert mask.dtype == np.float32 and mask[:5].all() and not mask[5].any()
  limited = list(pipeline.eval_batches(rows, batch_size=2, max_rows=3))
  assert len(limited) == 2
  assert limited[1]["loss_mask"][:, 0].tolist() == [1.0, 0.0]


def test_unigram_bits_per_byte_by_hand():
  rows = np.array([[1, 1, 2, 3]], dtype=np.int32)
  piece_bytes = np.array([0, 1, 2, 1], dtype=np.int32)
  # p = (1/2, 1/4, 1/4): H = 1.5 bits/token, 4 tokens, 1+1+2+1 = 5 bytes.
  assert math.isclose(pipeline.unigram_bits_per_byte(rows, piece_bytes),
                      1.5 * 4 / 5)


def test_unigram_bits_per_byte_single_token_is_zero():
  rows = np.full((2, 3), 7, dtype=np.int32)
  assert pipeline.unigram_bits_per_byte(rows, np.ones(8, np.int32)) == 0.0


def test_unigram_bits_per_byte_on_prepared(prepared):
  bpb = pipeline.unigram_bits_per_byte(prepared.val_rows,
                                       prepared.tokenizer.piece_bytes())
  assert 1.0 < bpb < 8.0
