"""Tests of dlm.data.packing: streaming shard/tokenize/pack/batch pipeline."""

from __future__ import annotations

import json
import re

import grain
import numpy as np
import pytest

from dlm.data import packing

NUM_DOCS = 120
WORDS = ("def", "return", "self", "x", "=", "+", "(", ")", ":", "if", "else",
         "for", "in", "range", "λ", "é", "0", "42", "\n", "\n    ", "#")


def make_texts(n: int, seed: int = 0) -> list[str]:
  """Documents with a unique id line and a random body (some long, some not)."""
  rng = np.random.default_rng(seed)
  texts = []
  for i in range(n):
    n_words = int(rng.choice([0, 3, 20, 80, 200]))
    body = " ".join(rng.choice(WORDS, size=n_words))
    texts.append(f"# doc {i:04d}\n{body}")
  return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
  return make_texts(NUM_DOCS)


@pytest.fixture(scope="module")
def docs(texts) -> grain.MapDataset:
  return grain.MapDataset.source(texts)


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tok.model"
  return packing.train_tokenizer_from_docs(
      docs, path, vocab_size=300, max_chars=20_000, seed=0)


def take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def rows_of(batches) -> list[dict[str, np.ndarray]]:
  """Per-row dicts from a list of [B, L] batches."""
  return [{k: v[i] for k, v in b.items()}
          for b in batches for i in range(b["tokens"].shape[0])]


def decode_stream(batches, tok) -> list[str]:
  """Documents recovered from concat rows: real tokens split at eos."""
  stream = np.concatenate(
      [r["tokens"][r["loss_mask"] > 0] for r in rows_of(batches)])
  ends = np.flatnonzero(stream == tok.eos_id)
  assert ends.size and ends[-1] == stream.size - 1, "stream must end with eos"
  return [tok.decode(d[:-1]) for d in np.split(stream, ends + 1)[:-1]]


def expected_order(docs, *, seed, process_index=0, process_count=1,
                   num_epochs=1) -> list[str]:
  shard = packing.shard_documents(
      docs, seed=seed, process_index=process_index,
      process_count=process_count, num_epochs=num_epochs)
  return [shard[i] for i in range(len(shard))]


def check_segments(row: dict[str, np.ndarray], eos_id: int) -> None:
  """segment_ids/positions restart exactly after each eos inside the row."""
  real = np.flatnonzero(row["loss_mask"] > 0)
  segment, start = 1, 0
  for t in real:
    assert row["segment_ids"][t] == segment
    assert row["positions"][t] == t - start
    if row["tokens"][t] == eos_id:
      segment, start = segment + 1, t + 1
  pad = row["loss_mask"] == 0
  assert not row["segment_ids"][pad].any() and not row["positions"][pad].any()


def test_concat_round_trip_one_epoch(docs, texts, tok):
  it = packing.stream_batches(docs, tok, seq_len=16, batch_size=4, seed=3,
                              num_epochs=1)
  batches = list(it)
  for b in batches:
    assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32
    assert b["segment_ids"].dtype == b["positions"].dtype == np.int32
  decoded = decode_stream(batches, tok)
  assert decoded == expected_order(docs, seed=3)
  assert sorted(decoded) == sorted(texts)
  rows = rows_of(batches)
  for r in rows:
    check_segments(r, tok.eos_id)
  # Only the tail of the last row and padding rows of the last batch are pad.
  masks = np.concatenate([r["loss_mask"] for r in rows])
  assert np.all(np.diff(masks) <= 0)
  assert masks.size - masks.sum() < 4 * 16  # At most the last batch.


def test_concat_continued_document_is_new_segment(docs, tok):
  rows = rows_of(take(packing.stream_batches(
      docs, tok, seq_len=16, batch_size=8, seed=0), 10))
  continued = [r for r in rows[1:] if r["positions"][0] == 0]
  assert len(continued) == len(rows) - 1  # Every row starts a segment at 0.
  assert all(r["segment_ids"][0] == 1 for r in rows)


def test_pad_mode_one_document_per_row(docs, tok):
  seq_len = 24
  batches = list(packing.stream_batches(
      docs, tok, seq_len=seq_len, batch_size=8, seed=1, packing="pad",
      num_epochs=1))
  rows = [r for r in rows_of(batches) if r["loss_mask"].any()]
  order = expected_order(docs, seed=1)
  assert len(rows) == len(order) == NUM_DOCS
  for r, text in zip(rows, order):
    ids = tok.encode(text) + [tok.eos_id]
    n = min(len(ids), seq_len)
    np.testing.assert_array_equal(r["tokens"][:n], ids[:n])
    assert (r["tokens"][n:] == tok.pad_id).all()
    np.testing.assert_array_equal(r["loss_mask"], np.arange(seq_len) < n)
    np.testing.assert_array_equal(r["segment_ids"], np.arange(seq_len) < n)
    np.testing.assert_array_equal(r["positions"][:n], np.arange(n))
    assert tok.decode(r["tokens"][:n]) == tok.decode(ids[:seq_len])


def test_two_processes_see_every_document_once(docs, texts, tok):
  seen = []
  for p in range(2):
    it = packing.stream_batches(docs, tok, seq_len=32, batch_size=4, seed=7,
                                process_index=p, process_count=2,
                                num_epochs=1)
    got = decode_stream(list(it), tok)
    assert got == expected_order(docs, seed=7, process_index=p,
                                 process_count=2)
    seen.append(got)
  assert len(seen[0]) == len(seen[1]) == NUM_DOCS // 2
  ids = [int(re.match(r"# doc (\d+)\n", t).group(1)) for t in seen[0] + seen[1]]
  assert sorted(ids) == list(range(NUM_DOCS))
  assert sorted(seen[0] + seen[1]) == sorted(texts)


def test_epochs_reshuffle(docs, texts, tok):
  order = expected_order(docs, seed=5, num_epochs=2)
  first, second = order[:NUM_DOCS], order[NUM_DOCS:]
  assert sorted(first) == sorted(second) == sorted(texts)
  assert first != second
  it = packing.stream_batches(docs, tok, seq_len=32, batch_size=4, seed=5,
                              num_epochs=2)
  assert decode_stream(list(it), tok) == order


@pytest.mark.parametrize("mode", ["concat", "pad"])
def test_mid_epoch_restore_matches_uninterrupted(docs, tok, mode):
  kwargs = dict(seq_len=16, batch_size=3, seed=11, packing=mode,
                truncate_fraction=0.2)
  full = take(packing.stream_batches(docs, tok, **kwargs), 40)
  it = packing.stream_batches(docs, tok, **kwargs)
  take(it, 17)
  state = json.loads(json.dumps(it.get_state()))
  if mode == "concat":
    assert state["doc_offset"] > 0, "pick a step inside a document"
  take(it, 5)  # The saved iterator moves on; the state must not.
  restored = packing.stream_batches(docs, tok, **kwargs)
  restored.set_state(state)
  for want, got in zip(full[17:], take(restored, 23)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_restore_across_epoch_end(docs, tok):
  kwargs = dict(seq_len=64, batch_size=4, seed=2, num_epochs=2)
  full = list(packing.stream_batches(docs, tok, **kwargs))
  k = len(full) // 2 + 1
  it = packing.stream_batches(docs, tok, **kwargs)
  take(it, k)
  restored = packing.stream_batches(docs, tok, **kwargs)
  restored.set_state(json.loads(json.dumps(it.get_state())))
  rest = list(restored)
  assert len(rest) == len(full) - k
  for want, got in zip(full[k:], rest):
    np.testing.assert_array_equal(want["tokens"], got["tokens"])


def cut_fraction(batches) -> float:
  rows = rows_of(batches)
  return np.mean([r["loss_mask"].sum() < r["loss_mask"].size for r in rows])


def test_truncate_fraction(docs, tok):
  kwargs = dict(seq_len=32, batch_size=8, seed=4, truncate_fraction=0.3)
  a = take(packing.stream_batches(docs, tok, **kwargs), 50)  # 400 rows.
  b = take(packing.stream_batches(docs, tok, **kwargs), 50)
  assert 0.2 < cut_fraction(a) < 0.4
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  for r in rows_of(a):
    n = int(r["loss_mask"].sum())
    assert n >= 1 and (r["loss_mask"][:n] == 1).all()
    assert (r["tokens"][n:] == tok.pad_id).all()
    check_segments(r, tok.eos_id)
  none = take(packing.stream_batches(docs, tok, **{
      **kwargs, "truncate_fraction": 0.0}), 50)
  assert cut_fraction(none) == 0.0


def test_truncation_drops_cut_tokens_but_keeps_stream(docs, tok):
  kwargs = dict(seq_len=32, batch_size=8, seed=4)
  whole = rows_of(take(packing.stream_batches(docs, tok, **kwargs), 10))
  cut = rows_of(take(packing.stream_batches(
      docs, tok, truncate_fraction=0.5, **kwargs), 10))
  for w, c in zip(whole, cut):
    n = int(c["loss_mask"].sum())
    np.testing.assert_array_equal(w["tokens"][:n], c["tokens"][:n])


def test_segment_ids_off(docs, tok):
  b = next(packing.stream_batches(docs, tok, seq_len=16, batch_size=2, seed=0,
                                  segment_ids=False))
  assert sorted(b) == ["loss_mask", "tokens"]


def test_worker_processes_match_in_process(docs, tok):
  kwargs = dict(seq_len=32, batch_size=4, seed=9, num_epochs=1)
  want = list(packing.stream_batches(docs, tok, **kwargs))
  it = packing.stream_batches(docs, tok, worker_count=2, **kwargs)
  got = take(it, 5)
  restored = packing.stream_batches(docs, tok, worker_count=2, **kwargs)
  restored.set_state(json.loads(json.dumps(it.get_state())))
  got += list(restored)
  it.close()
  assert len(got) == len(want)
  for x, y in zip(want, got):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


class CountingSource:
  """A random-access source that counts the documents read."""

  def __init__(self, texts: list[str]):
    self.texts, self.reads = texts, 0

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, i: int) -> str:
    self.reads += 1
    return self.texts[i]


def test_train_tokenizer_reads_a_bounded_sample(texts, tmp_path):
  source = CountingSource(texts * 50)
  docs = grain.MapDataset.source(source)
  tok = packing.train_tokenizer_from_docs(
      docs, tmp_path / "t.model", vocab_size=300, max_chars=3_000, seed=0)
  assert tok.vocab_size == 300
  assert source.reads < len(source) // 10
  sample = packing.sample_documents(docs, max_chars=3_000, seed=0)
  assert sum(map(len, sample)) <= 3_000
  assert sample == packing.sample_documents(docs, max_chars=3_000, seed=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(packing="nope"), "packing"),
    (dict(truncate_fraction=1.5), "truncate_fraction"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(num_epochs=0), "num_epochs"),
])
def test_bad_arguments(docs, tok, kwargs, match):
  with pytest.raises(ValueError, match=match):
    packing.stream_batches(docs, tok, seq_len=8, batch_size=2, seed=0,
                           **kwargs)


@pytest.mark.parametrize("process_count", [3, 7])
def test_document_shards_partition_each_epoch(docs, texts, process_count):
  for epoch in range(2):
    seen = []
    for p in range(process_count):
      order = expected_order(docs, seed=1, process_index=p,
                             process_count=process_count, num_epochs=2)
      half = len(order) // 2
      seen += order[epoch * half:(epoch + 1) * half]
    assert sorted(seen) == sorted(texts)
