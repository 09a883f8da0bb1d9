"""Launchers: the TPU pod command line, the SLURM environment, local.sh's failure handling."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tpu_pod_runs_on_all_workers_with_distributed():
  out = subprocess.run(
      [str(ROOT / "launch" / "tpu_pod.sh"), "--tpu=pod", "--zone=us-east5-a", "--setup", "--",
       "dlm", "train", "--config=configs/quickstart.py", "--workdir=/mnt/w", "--config.mesh.fsdp=4"],
      env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 3 and all("--worker=all" in l for l in lines)
  assert "tpu-vm scp" in lines[0] and ".\\[tpu\\]" in lines[1]  # installs the tpu extra
  assert "dlm\\ train" in lines[2] and "--config.mesh.fsdp=4\\ --distributed" in lines[2]
  bad = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), "--zone=z", "--", "dlm", "train"],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "usage" in bad.stderr


def _fake(bin_dir: pathlib.Path, name: str, body: str) -> None:
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_gives_each_task_its_rank(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(bin_dir, "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
  # srun: run the task once per rank, as SLURM would on each node
  _fake(bin_dir, "srun", 'shift 2; for r in 0 1; do SLURM_PROCID=$r "$@"; done\n')
  (tmp_path / ".venv" / "bin").mkdir(parents=True)
  (tmp_path / ".venv" / "bin" / "activate").write_text("")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[a-b]",
             SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(tmp_path))
  out = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "bash", "-c",
                        'echo "$DLM_COORDINATOR_ADDRESS $DLM_NUM_PROCESSES $DLM_PROCESS_ID"'],
                       env=env, capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == ["gpu-a:12355 2 0", "gpu-a:12355 2 1"]


def test_local_launcher_stops_the_others_when_one_fails():
  cmd = [str(ROOT / "launch" / "local.sh"), "2", "--", "bash", "-c",
         'if [ "$DLM_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 30']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
  assert proc.returncode == 3 and "process 1 exited with status 3" in proc.stderr
  assert subprocess.run([str(ROOT / "launch" / "local.sh"), "x", "--", "true"],
                        capture_output=True).returncode == 2
