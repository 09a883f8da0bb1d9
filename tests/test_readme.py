"""The README's first screen: two commands, and CI runs exactly the test one."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  first_screen = "\n".join(text.splitlines()[:40])
  return re.findall(r"```bash\n(.+?)\n```", first_screen, flags=re.S)


def test_two_commands_on_the_first_screen():
  cmds = _commands()
  assert len(cmds) == 2, cmds
  quickstart, tests = cmds
  assert "dlm train --config=configs/quickstart.py" in quickstart and "dlm sample" in quickstart
  assert "pytest" in tests
  for cmd in cmds:
    assert cmd.startswith("python3.11 -m venv .venv && . .venv/bin/activate && ")


def test_ci_runs_the_readme_test_command():
  tests = _commands()[1]
  install_and_test = tests.split(". .venv/bin/activate && ", 1)[1]
  ci = (ROOT / ".ci" / "run").read_text()
  assert install_and_test in ci.splitlines(), (install_and_test, ci)
