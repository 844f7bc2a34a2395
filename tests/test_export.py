"""Orbax export of a quantized model: a fresh process reloads identical logits; damaged or
incomplete exports give one clear error."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import cqjax
from conftest import REPO, TINY_DEFAULT
from cqjax.codebook import CodebookWeight
from cqjax.errors import CqjaxError
from cqjax.checkpoint import TREE_FILE
from cqjax.export import META_FILE, export_quantized, load_quantized

_RELOAD = """
import sys, numpy as np, jax.numpy as jnp, cqjax
q = cqjax.load_quantized(sys.argv[1])
tokens = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(q.module().apply({"params": q.params}, jnp.asarray(tokens))[0]))
print(type(cqjax.load_tokenizer(sys.argv[1])).__name__)
"""


@pytest.fixture(scope="module")
def quantized():
  cfg, params = cqjax.load_params(TINY_DEFAULT, jnp.float32, progress=False)
  windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 24))
  qcfg = cqjax.QuantizeConfig(bits=3, rotation="hadamard", group_size=64, pog=True, accf=None)
  return cqjax.quantize(params, cfg, windows, qcfg, progress=False), windows


@pytest.fixture
def exported(quantized, tmp_path):
  return export_quantized(str(tmp_path / "export"), quantized[0], TINY_DEFAULT, settings={"note": "test"})


def test_fresh_process_reloads_identical_logits(quantized, exported, tmp_path):
  qm, windows = quantized
  want = np.asarray(qm.module().apply({"params": qm.params}, jnp.asarray(windows))[0])
  np.save(tmp_path / "tokens.npy", windows)
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-c", _RELOAD, exported, str(tmp_path / "tokens.npy"), str(tmp_path / "got.npy")],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), want)
  loaded = load_quantized(exported)
  assert loaded.config == qm.config and loaded.act_quant == qm.act_quant
  assert loaded.online_down_hadamard and isinstance(loaded.params["layers_1"]["moe"]["down_proj"], CodebookWeight)
  np.testing.assert_array_equal(loaded.r1, qm.r1)
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_refuses_to_overwrite_unless_asked(quantized, exported):
  with pytest.raises(CqjaxError, match="already exists"):
    export_quantized(exported, quantized[0])
  export_quantized(exported, quantized[0], overwrite=True)
  assert not os.path.exists(os.path.join(exported, "tokenizer.json"))  # replaced, not merged
  load_quantized(exported)


def test_failed_export_leaves_nothing(quantized, tmp_path):
  target = tmp_path / "never"
  with pytest.raises(CqjaxError, match="no tokenizer files"):
    export_quantized(str(target), quantized[0], tokenizer_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []


def _largest_array_file(export):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(export, "arrays")) for f in fs]
  return max(files, key=os.path.getsize)


def test_truncated_array_file(exported):
  path = _largest_array_file(exported)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CqjaxError, match="arrays"):
    load_quantized(exported)


def test_flipped_bytes_in_an_array_file(exported):
  path = _largest_array_file(exported)
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  open(path, "wb").write(bytes(data))
  with pytest.raises(CqjaxError, match="is corrupt|cannot read the arrays"):
    load_quantized(exported)


def test_manifest_mismatch_names_the_array(exported):
  meta_path = os.path.join(exported, TREE_FILE)
  text = open(meta_path).read()
  open(meta_path, "w").write(text.replace('"crc32": ', '"crc32": 1', 1))
  with pytest.raises(CqjaxError, match=r"array \S+ is corrupt"):
    load_quantized(exported)
  load_quantized(exported, verify=False)


@pytest.mark.parametrize("damage,match", [
    ("delete", "missing"), ("garbage", "corrupt metadata"), ("version", "format version 99")])
def test_bad_metadata(exported, damage, match):
  meta_path = os.path.join(exported, META_FILE)
  if damage == "delete":
    os.remove(meta_path)
  elif damage == "garbage":
    open(meta_path, "w").write("{not json")
  else:
    text = open(meta_path).read()
    open(meta_path, "w").write(text.replace('"format_version": 1', '"format_version": 99'))
  with pytest.raises(CqjaxError, match=match):
    load_quantized(exported)


def test_missing_directory(tmp_path):
  with pytest.raises(CqjaxError, match="export directory not found"):
    load_quantized(str(tmp_path / "nope"))
