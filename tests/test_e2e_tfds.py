"""A TFDS dataset prepared here (a tiny local builder, no download) trains through `dlm train`
by changing only the config; so do local JSON Lines files, with a tokenizer from
`dlm tokenizer train`, segment ids and LLaDA truncation."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from dlm.data import corpora, tfds_stdlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{ROOT}/configs/quickstart.py:smoke"


def _docs() -> list[str]:
  """~600 KB of real Python: the first stdlib files, in 2 KB pieces."""
  texts = [f.read_text(encoding="utf-8") for f in corpora.stdlib_files()[:60]]
  return [t[i:i + 2048] for t in texts for i in range(0, len(t), 2048)]


class TinyCodeForE2e(tfds.core.GeneratorBasedBuilder):
  """Python source snippets; every 10th is validation."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return tfds_stdlib.local_code_path(cls)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict({"code": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(False), "validation": self._generate_examples(True)}

  def _generate_examples(self, val: bool) -> Iterator[tuple[int, dict]]:
    for i, doc in enumerate(_docs()):
      if (i % 10 == 0) == val:
        yield i, {"code": doc}


def dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, f"dlm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
  return proc


def _trained_ok(workdir: pathlib.Path) -> None:
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert any("val_bits_per_byte" in r for r in records)
  out = json.loads(dlm("eval", f"--workdir={workdir}").stdout.strip().splitlines()[-1])
  assert out["step"] == 20 and 0 < out["bits_per_byte"] < 20


def test_tfds_source_trains_by_config_only(tmp_path):
  data_dir = tmp_path / "tfds"
  TinyCodeForE2e(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  workdir = tmp_path / "run"
  dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=20",
      "--config.data.source=tfds", "--config.data.tfds.name=tiny_code_for_e2e",
      f"--config.data.tfds.data_dir={data_dir}", "--config.data.tfds.text_field=code")
  _trained_ok(workdir)


def test_jsonl_files_train_with_truncation_and_resume(tmp_path):
  docs = _docs()
  for split, part in (("train", docs[1::10] + docs[2::10] + docs[3::10]), ("val", docs[::10])):
    with open(tmp_path / f"{split}.jsonl", "w") as f:
      for d in part:
        f.write(json.dumps({"body": d}) + "\n")
  workdir = tmp_path / "run"
  data = [f"--config={SMOKE}", "--config.data.source=files",
          f"--config.data.files.train_glob={tmp_path}/train.jsonl",
          f"--config.data.files.val_glob={tmp_path}/val.jsonl", "--config.data.files.jsonl_field=body"]
  tok = tmp_path / "unigram.model"
  out = json.loads(dlm("tokenizer", "train", *data, f"--out={tok}",
                       "--config.data.tokenizer_type=unigram").stdout.strip().splitlines()[-1])
  assert out["vocab_size"] == 512 and tok.exists()
  common = data + [f"--workdir={workdir}", "--config.data.truncate_fraction=0.1",
                   f"--config.data.tokenizer={tok}"]
  dlm("train", *common, "--config.train.steps=10")
  assert (workdir / "tokenizer.model").read_bytes() == tok.read_bytes()  # stored with the run
  out = dlm("train", *common, "--config.train.steps=20")  # resumes the streamed iterator
  assert "resumed from" in out.stdout
  _trained_ok(workdir)
