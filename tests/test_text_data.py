"""Text sources, evaluation windows and the seeded calibration sampler."""
import numpy as np
import pytest

from cqjax.errors import CqjaxError
from cqjax.load import load_tokenizer
from cqjax.text_data import calibration_windows, eval_windows, read_text, sample_windows, tokenize
from conftest import TEST_TEXT, TINY_DEFAULT


def test_eval_windows_are_non_overlapping_and_drop_the_tail():
  ids = np.arange(103, dtype=np.int32)
  w = eval_windows(ids, 10)
  assert w.shape == (10, 10)
  np.testing.assert_array_equal(w.reshape(-1), ids[:100])


def test_too_short_text_names_the_text():
  with pytest.raises(CqjaxError, match="wiki: 9 tokens is shorter than one window of seqlen=10"):
    eval_windows(np.arange(9), 10, "wiki")
  with pytest.raises(CqjaxError, match="too short for calibration"):
    sample_windows(np.arange(9), 4, 9)


def test_sample_windows_are_seeded_slices():
  ids = np.arange(1000, dtype=np.int32)
  a = sample_windows(ids, 8, 32, seed=3)
  np.testing.assert_array_equal(a, sample_windows(ids, 8, 32, seed=3))
  assert not np.array_equal(a, sample_windows(ids, 8, 32, seed=4))
  np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # contiguous slices of the text
  assert a.shape == (8, 32) and a.dtype == np.int32


def test_file_and_dataset_sources(tmp_path):
  import datasets
  name, text = read_text(TEST_TEXT)
  assert name == "wikitext2_valid_excerpt.txt" and len(text) > 10000
  ds = datasets.Dataset.from_dict({"text": ["first line", "second line"]})
  assert read_text(ds)[1] == "first line\n\nsecond line"
  tok = load_tokenizer(TINY_DEFAULT)
  w = calibration_windows(TEST_TEXT, tok, num=4, length=64, seed=0)
  assert w.shape == (4, 64)
  np.testing.assert_array_equal(w, calibration_windows(TEST_TEXT, tok, num=4, length=64, seed=0))
  assert len(tokenize(tok, text)) > 5000


def test_bad_sources(tmp_path):
  import datasets
  with pytest.raises(CqjaxError, match="missing.txt: text file not found"):
    read_text(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(CqjaxError, match="empty.txt: text is empty"):
    read_text(tmp_path / "empty.txt")
  with pytest.raises(CqjaxError, match="no column 'text'"):
    read_text(datasets.Dataset.from_dict({"body": ["x"]}))
