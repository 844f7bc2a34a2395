"""The README's Python example runs as written."""
import os
import re

from conftest import REPO


def test_readme_python_example_runs(monkeypatch):
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks
  monkeypatch.chdir(REPO)
  scope = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["logits"].shape[-1] == scope["cfg"].vocab_size
  assert scope["new_tokens"].shape == (1, 20)
