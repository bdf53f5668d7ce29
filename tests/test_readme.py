"""README's Python examples run as written (a newcomer copies them verbatim)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the README's forward pass runs op by op (eagerly), each op compiled
def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  assert blocks, "README.md should show how to build a model and run a forward pass"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
