"""Training data from elsewhere is untrusted input (issue 15, data side).

* A one-line file of any length is read and tokenized in chunks of
  ``data.tokenize_chunk_chars`` characters: peak memory does not grow with the
  line on the streamed ``files`` path, and grows by a few bytes per character
  (the token stream itself) on the in-memory ``data.root`` path
  (``benchmarks/long_line.py``, run here on small files).
* Chunks end where sentencepiece starts a word, so chunked ids equal whole ids.
* With ``data.root``, a non-UTF-8 file fails under ``invalid_utf8="fail"`` in
  one line naming the file and the fix, is counted under ``"skip"``.
"""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import pytest

from dlm import errors
from dlm.data import corpora
from dlm.data import inputs
from dlm.data import packing
from dlm.data import pipeline
from dlm.data import sources
from dlm.data import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHUNK = 1024  # The smallest data.tokenize_chunk_chars: many chunks in small texts.


def _stdlib_text(max_chars: int) -> str:
  """Real code from the stdlib, about ``max_chars`` characters."""
  parts, total = [], 0
  for path in corpora.stdlib_files():
    parts.append(path.read_text(encoding="utf-8", errors="replace"))
    total += len(parts[-1])
    if total >= max_chars:
      break
  return "".join(parts)[:max_chars]


@pytest.fixture(scope="module")
def code() -> str:
  return _stdlib_text(120_000)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, code, tmp_path_factory) -> tokenizer_lib.Tokenizer:
  path = tmp_path_factory.mktemp("tok") / "tok.model"
  return tokenizer_lib.train_tokenizer([code], path, vocab_size=400, max_chars=100_000,
                                       model_type=request.param)


@pytest.fixture(scope="module")
def bpe(code, tmp_path_factory) -> tokenizer_lib.Tokenizer:
  """A BPE tokenizer (the trainer's default): chunked ids equal whole ids exactly."""
  path = tmp_path_factory.mktemp("bpe") / "tok.model"
  return tokenizer_lib.train_tokenizer([code], path, vocab_size=400, max_chars=100_000)


def _one_line_error(exc_info) -> str:
  message = str(exc_info.value)
  assert "\n" not in message, message
  return message


# ------------------------------------------------------ chunked tokenization --

@pytest.mark.parametrize("chunk_chars", [CHUNK, 1500, 4096, 50_000])
def test_chunked_ids_equal_whole_ids(tok, code, chunk_chars):
  """Text with spaces: encode_chunks (any piece size) == encode of the whole text.

  BPE: exactly. Unigram: the same number of ids and the same text; a few equal-score
  splits of a run of spaces (the same pieces in another order) may resolve differently,
  as the Viterbi sums round differently after another prefix.
  """
  one_line = code.replace("\n", " ")
  for text in (code, one_line):
    pieces = [text[i:i + 777] for i in range(0, len(text), 777)]
    got = np.concatenate(list(tok.encode_chunks(pieces, chunk_chars=chunk_chars)))
    whole = np.asarray(tok.encode(text))
    assert tok.decode(got) == text
    if _model_type(tok) == "bpe":
      np.testing.assert_array_equal(got, whole)
    else:
      assert got.shape == whole.shape and np.mean(got != whole) < 1e-3


def _model_type(tok: tokenizer_lib.Tokenizer) -> str:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok.path.read_bytes())
  return "bpe" if proto.trainer_spec.model_type == 2 else "unigram"


def test_chunks_are_bounded_and_cover_the_text():
  """Chunks never exceed chunk_chars, join back to the text, cut at a word start if any."""
  text = ("ab  cd " * 700) + ("x" * 5000) + (" " * 3000) + "tail"
  chunks = list(tokenizer_lib.text_chunks([text[i:i + 333] for i in range(0, len(text), 333)],
                                          CHUNK))
  assert "".join(chunks) == text
  assert max(len(c) for c in chunks) <= CHUNK
  for chunk, after in zip(chunks, chunks[1:]):
    # Inside the "ab  cd" part every cut is a space after a non-space.
    if chunk.startswith(("ab", " ab", " cd")) and after[:1] == " ":
      assert chunk[-1] != " "
  assert list(tokenizer_lib.text_chunks(["short"], CHUNK)) == ["short"]


def test_no_space_line_still_round_trips(tok):
  """A line with no safe cut is hard-cut at chunk_chars: ids may differ, text does not."""
  text = "x=" * 4000 + "\u2581" + "y" * 3000
  ids = np.concatenate(list(tok.encode_chunks([text], chunk_chars=CHUNK)))
  assert tok.decode(ids) == text


@pytest.mark.parametrize("value", [0, 10, -5, 1.5, "big", True])
def test_bad_chunk_chars_is_a_user_error(value):
  with pytest.raises(errors.UserError, match="tokenize_chunk_chars") as info:
    sources.chunk_chars_of({"tokenize_chunk_chars": value})
  _one_line_error(info)


def test_training_sample_matches_the_line_list_version(code):
  """The span-based sample equals the old one built from splitlines (same chunks, order)."""
  texts = [code, "a\r\nb\rc\x0bd\x0ce\x1cf\x85g\u2028h\u2029i\n\n", "z" * 9000, ""]

  def old_chunks(text, chunk_chars):
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
      for start in range(0, len(line), chunk_chars):
        part = line[start:start + chunk_chars]
        if size + len(part) > chunk_chars and buf:
          yield "".join(buf)
          buf, size = [], 0
        buf.append(part)
        size += len(part)
    if buf:
      yield "".join(buf)

  for chunk_chars in (7, 100, 2048):
    assert [c for t in texts for c in tokenizer_lib._line_chunks(t, chunk_chars)] == [
        c for t in texts for c in old_chunks(t, chunk_chars)]
  chunks = [c for t in texts for c in old_chunks(t, 2048)]
  order = np.random.default_rng(3).permutation(len(chunks))
  expect, total = [], 0
  for i in order:
    if total + len(chunks[i]) <= 40_000:
      expect.append(chunks[i])
      total += len(chunks[i])
  assert tokenizer_lib.training_sample(texts, max_chars=40_000, seed=3) == expect


# ------------------------------------------------------ streamed long files --

def _long_file(tmp_path: pathlib.Path, text: str, name: str = "long.txt") -> pathlib.Path:
  path = tmp_path / name
  path.write_bytes(text.encode("utf-8"))
  return path


def _rows(docs, tok, chunk_chars, packing_mode="concat", seq_len=64):
  it = packing.stream_batches(docs, tok, seq_len=seq_len, batch_size=4, seed=0,
                              packing=packing_mode, num_epochs=1, chunk_chars=chunk_chars)
  return list(it)


@pytest.mark.parametrize("packing_mode", ["concat", "pad"])
def test_long_file_streams_and_packs_as_one_document(bpe, code, tmp_path, packing_mode):
  """A text file over tokenize_chunk_chars bytes is a TextStream; rows equal those of its str."""
  text = code.replace("\n", " ") + " é✓ end"
  path = _long_file(tmp_path, text)
  docs = sources.make_source({"source": "files", "files": {"train_glob": str(path)},
                              "tokenize_chunk_chars": CHUNK}, "train")
  assert isinstance(docs[0], sources.TextStream)
  streamed = _rows(docs, bpe, CHUNK, packing_mode)
  whole = _rows(grain.MapDataset.source([text]), bpe, 10**9, packing_mode)
  assert len(streamed) == len(whole) > 0
  for a, b in zip(streamed, whole):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  if packing_mode == "concat":
    tokens = np.concatenate([b["tokens"][b["loss_mask"] > 0] for b in streamed])
    assert bpe.decode(tokens) == text


def test_restore_inside_a_long_document_continues_exactly(bpe, code, tmp_path):
  """The packer's state mid-document (several chunks in) restores to the same next rows."""
  path = _long_file(tmp_path, code.replace("\n", " ") * 2)
  cfg = {"source": "files", "files": {"train_glob": str(path)}, "tokenize_chunk_chars": CHUNK}
  docs = sources.make_source(cfg, "train")
  make = lambda: packing.stream_batches(docs, bpe, seq_len=128, batch_size=2, seed=0,
                                        num_epochs=1, chunk_chars=CHUNK)
  it = make()
  for _ in range(37):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert "doc_offset\": 0" not in json.dumps(state)
  expect = [next(it) for _ in range(5)]
  again = make()
  again.set_state(state)
  for a, b in zip(expect, [next(again) for _ in range(5)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_token_chunks_pickle_to_workers(bpe, code, tmp_path):
  """A long document's lazy ids cross a process boundary as a path and settings."""
  path = _long_file(tmp_path, code)
  stream = sources.TextStream(str(path), "fail", CHUNK)
  lazy = packing.TokenizeWithEos(bpe, CHUNK).map(stream)
  assert isinstance(lazy, packing.TokenChunks)
  data = pickle.dumps(lazy)
  assert len(data) < 2000
  ids = np.concatenate(list(pickle.loads(data)))
  np.testing.assert_array_equal(ids, bpe.encode(code) + [bpe.eos_id])
  assert stream.head(100) == code[:100]


def test_multibyte_characters_across_read_blocks(tmp_path):
  """Blocks of chunk_chars bytes cut characters apart; the incremental decoder joins them."""
  text = ("é✓ 𝄞x" * 3000)
  stream = sources.TextStream(str(_long_file(tmp_path, text)), "fail", CHUNK)
  assert "".join(stream.pieces()) == text


@pytest.mark.parametrize("scan", [True, False])
def test_long_file_with_invalid_utf8_fails_naming_file_and_byte(tmp_path, scan):
  """invalid_utf8="fail": the scan (or the read) names the file and the exact byte."""
  good = ("word " * 2000).encode()
  path = tmp_path / "bad.txt"
  path.write_bytes(good + b"\xff" + good)
  cfg = {"source": "files", "files": {"train_glob": str(path)}, "tokenize_chunk_chars": CHUNK,
         "scan": scan, "invalid_utf8": "fail"}
  with pytest.raises(errors.UserError) as info:
    docs = sources.make_source(cfg, "train")
    list(docs[0].pieces())
  message = _one_line_error(info)
  assert str(path) in message and f"byte {len(good)}" in message
  assert "invalid_utf8='skip'" in message


def test_long_file_with_invalid_utf8_is_skipped_under_skip(tmp_path, caplog):
  (tmp_path / "good.txt").write_text("fine text " * 500)
  (tmp_path / "bad.txt").write_bytes(b"word " * 500 + b"\xc3")  # Truncated at the end.
  cfg = {"source": "files", "files": {"train_glob": str(tmp_path / "*.txt")},
         "tokenize_chunk_chars": CHUNK, "invalid_utf8": "skip"}
  with caplog.at_level(logging.WARNING):
    docs = sources.make_source(cfg, "train")
  stats = sources.source_stats(docs)
  assert len(docs) == 1 and stats.skipped == 1 and stats.first_skipped.endswith("bad.txt")
  assert "".join(docs[0].pieces()) == "fine text " * 500


def test_jsonl_index_of_a_long_line_reads_in_blocks(tmp_path):
  """Line offsets are found block by block, with the same blank-line rule as before."""
  path = tmp_path / "data.jsonl"
  lines = [b"", json.dumps({"text": "x " * 200_000}).encode(), b"  \t", b'{"text": "b"}']
  path.write_bytes(b"\n".join(lines))
  expect, offset = [], 0
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        expect.append((offset, number))
      offset += len(line)
  for block in (1, 5, 4096, 1 << 20):
    assert list(sources._nonblank_lines(str(path), block)) == expect
  docs = sources.make_source({"source": "files", "files": {"train_glob": str(path)}}, "train")
  assert [len(d) for d in sources.iter_documents(docs)] == [400_000, 1]


# ---------------------------------------------------- data.root and UTF-8 --

def _root(tmp_path: pathlib.Path) -> pathlib.Path:
  root = tmp_path / "root"
  for i, path in enumerate(corpora.stdlib_files()[:60]):
    dest = root / f"m{i}.py"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(path.read_bytes()[:4000])
  (root / "latin1.py").write_bytes("# caf\xe9 = 1\n".encode("latin-1"))
  return root


def _root_cfg(root: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="stdlib", root=str(root), vocab_size=350, seq_len=32, val_permille=200,
             tokenizer_max_chars=100_000, invalid_utf8="fail")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_root_with_a_non_utf8_file_fails_under_fail(tmp_path):
  """data.root + invalid_utf8="fail": one line naming the file and both options; nothing written."""
  root, workdir = _root(tmp_path), tmp_path / "work"
  with pytest.raises(errors.UserError) as info:
    pipeline.prepare(_root_cfg(root), workdir)
  message = _one_line_error(info)
  assert str(root / "latin1.py") in message and "invalid_utf8='skip'" in message
  assert not workdir.exists()
  with pytest.raises(errors.UserError, match="latin1.py"):
    sources.make_source(_root_cfg(root), "train")
  with pytest.raises(errors.UserError, match="latin1.py"):
    inputs.make_train_input(_root_cfg(root), workdir, batch_size=2, seed=0)


def test_root_fail_is_the_default_when_the_field_is_absent(tmp_path):
  cfg = _root_cfg(_root(tmp_path))
  del cfg["invalid_utf8"]
  with pytest.raises(errors.UserError, match="latin1.py"):
    pipeline.prepare(cfg, tmp_path / "work")


def test_root_with_a_non_utf8_file_is_counted_under_skip(tmp_path, caplog):
  root = _root(tmp_path)
  with caplog.at_level(logging.WARNING):
    data = pipeline.prepare(_root_cfg(root, invalid_utf8="skip"), tmp_path / "work")
  assert data.meta["skipped_files"] == 1
  warnings = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
  assert len(warnings) == 1 and "latin1.py" in warnings[0] and "skipped 1" in warnings[0]
  assert sources.source_stats(
      sources.make_source(_root_cfg(root, invalid_utf8="skip"), "train")).skipped == 1


def test_root_unknown_policy_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="invalid_utf8") as info:
    pipeline.prepare(_root_cfg(_root(tmp_path), invalid_utf8="ignore"), tmp_path / "work")
  _one_line_error(info)


def test_root_long_line_tokens_equal_whole_encoding(tmp_path):
  """The in-memory path tokenizes in chunks too: its stream equals encode() of each file + eos."""
  root = _root(tmp_path)
  (root / "latin1.py").unlink()
  (root / "m0.py").write_text(_stdlib_text(30_000).replace("\n", " "))
  cfg = _root_cfg(root, tokenize_chunk_chars=CHUNK)
  data = pipeline.prepare(cfg, tmp_path / "work")
  corpus = corpora.load_corpus(root=root, val_permille=200)
  expect = np.concatenate([np.array(data.tokenizer.encode(t) + [data.tokenizer.eos_id])
                           for t in corpus.train])
  stream = np.load(tmp_path / "work" / "data" / "train.npy")
  np.testing.assert_array_equal(stream, expect)
  assert pipeline.prepare(cfg, tmp_path / "work").meta["cache_hit"]


# ------------------------------------------------------------- peak memory --

def _bench(mb: float, paths: str) -> dict[str, dict]:
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "long_line.py"), f"--mb={mb}", f"--paths={paths}",
       "--tokenizer_max_chars=300000"],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {row["path"]: row for row in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]}


def test_one_line_file_peak_memory_is_bounded():
  """benchmarks/long_line.py on a 4 MB and a 16 MB one-line file, peak RSS of each worker.

  The issue's bar is a peak under 1 GB for a 200 MB line (11.7 GB before). Over
  the 12 MB between the files: the streamed path must not grow with the line
  (under 0.75 MB per MB: its buffer is the chunk, reached by 4 MB); the
  in-memory data.root path holds the token stream (4 bytes a token), at most
  4 MB per MB of file, the slope that keeps 200 MB under 1 GB over a ~200 MB
  baseline. (Each worker reports its own ru_maxrss: RUSAGE_CHILDREN of the
  test process would be the largest of every child it ever waited for.)
  """
  small, big = _bench(4, "files,root"), _bench(16, "files,root")
  for path in ("files", "root"):
    assert big[path]["tokens"] > 3 * small[path]["tokens"]
    # Each worker's growth over its own post-import baseline: the baselines alone
    # move by ~5 MB between runs on a loaded machine (CI saw 269.5 vs 274.8 MB).
    growth = [r["peak_mb"] - r["baseline_mb"] for r in (small[path], big[path])]
    slope = (growth[1] - growth[0]) / 12
    assert slope < (0.75 if path == "files" else 4.0), (path, small[path], big[path])
    # Whatever the size, the peak stays within ~250 MB of the process after its imports.
    assert big[path]["peak_mb"] - big[path]["baseline_mb"] < 250, big[path]
