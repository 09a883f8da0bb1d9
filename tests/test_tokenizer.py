"""Tests for dlm.data.tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from dlm.data import corpora
from dlm.data import tokenizer as tokenizer_lib

TRICKY = [
    "",
    "\t\tindented = True\n",
    "a      b   \n\n\n",
    "   leading spaces",
    "trailing newlines\n\n",
    "crlf line\r\nnext\r\n",
    "caf\u00e9 na\u00efve \u4e2d\u6587 \u0391\u03b2\u03b3",
    "emoji \U0001F600\U0001F680 zwj \U0001F468\u200d\U0001F469",
    "unseen \u16a0\u16a1 \U00010348 \x00\x01\x7f \ufeff bom",
    "literal \u2581 lower block \u2581\u2581 and  spaces",
    "<mask> <s> </s> <pad> <unk> <0x41>",
    " ",
    "\n",
]


def _sample_texts(max_chars: int = 200_000) -> list[str]:
  texts, total = [], 0
  for path in corpora.stdlib_files():
    text = path.read_bytes().decode("utf-8", errors="ignore")
    texts.append(text)
    total += len(text)
    if total >= max_chars:
      break
  return texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
  return _sample_texts()


@pytest.fixture(scope="module")
def tok(texts, tmp_path_factory) -> tokenizer_lib.Tokenizer:
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tokenizer_lib.train_tokenizer(texts, path, vocab_size=400)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
      0, 1, 2, 3, 4)
  assert tok.vocab_size == 400
  assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id}) == 4


@pytest.mark.parametrize("text", TRICKY)
def test_exact_round_trip(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert int(tok.piece_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_round_trip_and_bytes_on_code(tok, texts):
  pb = tok.piece_bytes()
  for text, ids in zip(texts, tok.encode_batch(texts)):
    assert tok.decode(ids) == text
    assert int(pb[ids].sum()) == len(text.encode("utf-8"))


def test_encode_batch_matches_encode(tok):
  assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_mask_never_produced(tok, texts):
  specials = {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id}
  for ids in tok.encode_batch(texts + TRICKY):
    assert not specials & set(ids)
  assert tok.encode("<mask>") != [tok.mask_id]


def test_decode_specials(tok):
  ids = tok.encode("ab") + [tok.mask_id, tok.eos_id, tok.pad_id, tok.bos_id]
  assert tok.decode(ids) == "ab"
  assert tok.decode(ids, show_mask="\u2588") == "ab\u2588"
  assert tok.decode(np.array(ids, dtype=np.int32)) == "ab"
  pb = tok.piece_bytes()
  assert pb.shape == (tok.vocab_size,)
  assert pb[[0, 1, 2, 3, 4]].tolist() == [0] * 5
  assert pb[5:261].tolist() == [1] * 256  # Byte-fallback pieces.


def test_decode_rejects_out_of_range(tok):
  with pytest.raises(ValueError, match="ids must lie"):
    tok.decode([tok.vocab_size])


def test_newline_and_indent_pieces(tok, texts):
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert any("\n" in p and p != "\n" for p in pieces)
  assert "\u2581" * 4 in pieces and "\u2581" * 8 in pieces
  held_out = corpora.stdlib_files()[-3:]
  text = "".join(p.read_text(encoding="utf-8") for p in held_out)
  tokens_per_byte = len(tok.encode(text)) / len(text.encode("utf-8"))
  assert tokens_per_byte < 0.75  # Bytes alone would be 1.0.


def test_sample_is_bounded_and_deterministic(texts):
  a = tokenizer_lib.training_sample(texts, max_chars=50_000, seed=1)
  b = tokenizer_lib.training_sample(texts, max_chars=50_000, seed=1)
  c = tokenizer_lib.training_sample(texts, max_chars=50_000, seed=2)
  assert a == b != c
  assert 40_000 < sum(map(len, a)) <= 50_000
  assert all("\n" in chunk for chunk in a[:10])


def test_load_errors(tmp_path, tok):
  with pytest.raises(FileNotFoundError, match="train"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="retrain"):
    tokenizer_lib.load_tokenizer(bad)
  loaded = tokenizer_lib.load_tokenizer(tok.path)
  assert loaded.encode("x = 1\n") == tok.encode("x = 1\n")


def test_never_overwrites(tok):
  before = tok.path.read_bytes()
  with pytest.raises(FileExistsError):
    tokenizer_lib.train_tokenizer(["x = 1\n"], tok.path, vocab_size=300)
  assert tok.path.read_bytes() == before


def test_vocab_too_small(tmp_path, texts):
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer(texts, tmp_path / "t.model", vocab_size=100)
