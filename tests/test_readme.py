"""The README's Python examples run as written."""
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


def test_readme_quantize_example_runs(monkeypatch):
  from cqjax.codebook import CodebookWeight
  text = open(os.path.join(REPO, "README.md")).read()
  block = re.findall(r"```python\n(.*?)```", text, re.S)[1]
  assert len(block.strip().splitlines()) <= 15
  monkeypatch.chdir(REPO)
  scope = {}
  exec(compile(block, "README.md", "exec"), scope)  # pylint: disable=exec-used
  qm = scope["qm"]
  assert isinstance(qm.params["layers_0"]["moe"]["down_proj"], CodebookWeight) and qm.online_down_hadamard
  q_logits = scope["q_logits"]
  assert q_logits.shape == (2, 128, qm.config.vocab_size)
  fp_logits = scope["cqjax"].MoeCausalLM(scope["cfg"]).apply({"params": scope["params"]},
                                                              scope["jnp"].asarray(scope["calib"][:2]))[0]
  # W4A4 keeps most of the model's next-token choices.
  assert float((q_logits.argmax(-1) == fp_logits.argmax(-1)).mean()) > 0.5
