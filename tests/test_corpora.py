"""Tests for dlm.data.corpora."""

from __future__ import annotations

import pathlib
import zlib

import pytest

from dlm.data import corpora


def _write(root: pathlib.Path, rel: str, text: str | bytes) -> None:
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_bytes(text.encode("utf-8"))


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
  for i in range(40):
    _write(tmp_path, f"pkg{i % 4}/mod{i}.py", f"x = {i}\n")
  _write(tmp_path, "top.py", "print('hi')\n")
  _write(tmp_path, "pkg0/notes.txt", "not python\n")
  for excluded in ("test", "tests", "idle_test", "__pycache__",
                   "site-packages", "dist-packages", "unittest/test",
                   "lib2to3/tests/data"):
    _write(tmp_path, f"{excluded}/bad.py", "excluded = True\n")
  _write(tmp_path, "pkg1/latin1.py", b"s = '\xe9'\n")  # Not UTF-8.
  return tmp_path


def test_python_files_excludes_tests_and_site_packages(tree):
  files = corpora.python_files(tree)
  rels = [p.relative_to(tree).as_posix() for p in files]
  assert len(rels) == 42  # 40 modules + top.py + latin1.py.
  assert rels == sorted(rels)
  assert not any(r.endswith("bad.py") for r in rels)
  assert "pkg0/notes.txt" not in rels


def test_split_is_by_file_and_follows_the_crc_rule(tree):
  corpus = corpora.load_corpus(root=tree, val_permille=200)
  rels = [p.relative_to(tree).as_posix()
          for p in corpora.python_files(tree) if p.name != "latin1.py"]
  expect_val = [r for r in rels
                if zlib.crc32(r.encode()) % 1000 < 200]
  texts = {r: (tree / r).read_text() for r in rels}
  assert corpus.val == [texts[r] for r in expect_val]
  assert corpus.train == [texts[r] for r in rels if r not in expect_val]
  assert corpus.meta["val_files"] == len(expect_val) > 0
  assert corpus.meta["train_files"] + corpus.meta["val_files"] == 41
  assert corpus.meta["skipped_files"] == 1
  assert corpus.meta["train_bytes"] == sum(len(t.encode())
                                           for t in corpus.train)


def test_split_is_deterministic(tree):
  a = corpora.load_corpus(root=tree, val_permille=200)
  b = corpora.load_corpus(root=tree, val_permille=200)
  assert a == b


def test_empty_dir_names_the_path(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path)):
    corpora.load_corpus(root=tmp_path)


def test_only_train_files_is_an_error(tmp_path):
  # One file cannot fill both splits.
  _write(tmp_path, "a.py", "a = 1\n")
  with pytest.raises(ValueError, match="val"):
    corpora.load_corpus(root=tmp_path)


def test_unknown_source_lists_known():
  with pytest.raises(ValueError, match="stdlib"):
    corpora.load_corpus("wikipedia")


def test_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    corpora.load_corpus(root=tmp_path / "nope")


def test_real_stdlib_has_no_tests_or_site_packages():
  root = corpora.stdlib_root()
  rels = [p.relative_to(root).parts for p in corpora.stdlib_files()]
  assert len(rels) > 100
  assert not any(set(parts) & corpora.EXCLUDED_DIRS for parts in rels)
  assert all(parts[-1].endswith(".py") for parts in rels)
  assert ("json", "decoder.py") in rels
