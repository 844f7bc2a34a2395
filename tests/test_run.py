"""The main job on the embedded default checkpoint: its stages, one-line errors, export and resume."""
import json
import os
import subprocess
import sys

from conftest import REPO, TEST_TEXT


def _run(*overrides, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "experiments.run", "--config=tiny.py", *overrides],
                        cwd=cwd, capture_output=True, text=True, timeout=600)


def test_eval_stage_writes_report(tmp_path):
  other = tmp_path / "copy.txt"
  other.write_text(open(TEST_TEXT).read()[:20000])
  r = _run(f"--config.eval_texts={TEST_TEXT},{other}", "--config.seqlen=128", "--config.stages=eval",
           f"--config.output_dir={tmp_path}/out", "--config.sample_tokens=5", "--config.max_eval_windows=0")
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["seqlen"] == 128 and report["model_type"] == "mixtral"
  for name in ("wikitext2_valid_excerpt.txt", "copy.txt"):
    ppl = report["perplexity"][name]["fp"]
    # The trained reference model: far below the 8192-token vocabulary a random model would give.
    assert 1 < ppl < 2000, ppl
    assert report["tokens"][name] % 128 == 0 and report["tokens"][name] > 0
  assert report["sample"]["prompt"] == "The"


def test_rotate_stage_compares_three_rotations(tmp_path):
  import numpy as np
  r = _run(f"--config.eval_texts={TEST_TEXT}", "--config.seqlen=128", "--config.max_eval_windows=4",
           f"--config.calib_text={TEST_TEXT}", "--config.calib_samples=32", "--config.calib_seqlen=64",
           "--config.aos_epochs=2", "--config.aos_batch_size=8", f"--config.output_dir={tmp_path}",
           "--config.sample_tokens=0", "--config.stages=eval,rotate")
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.loads((tmp_path / "report.json").read_text())
  ppl = report["perplexity"]["wikitext2_valid_excerpt.txt"]
  assert set(ppl) == {"fp", "w16a4", "hadamard_w16a4", "learned_rotation_w16a4"}
  # 4-bit activations without a rotation lose accuracy; a Hadamard rotation wins most of it back.
  assert ppl["fp"] < ppl["hadamard_w16a4"] < ppl["w16a4"]
  rot = report["rotation"]
  assert rot["aos"]["orthogonality_error"] <= 1e-5 and len(rot["aos"]["loss_per_epoch"]) == 2
  assert len(rot["per_layer"]) == 2 * 4
  for row in rot["per_layer"]:
    assert row["max_over_rms"]["hadamard_w16a4"] < row["max_over_rms"]["w16a4"]
  r1 = np.load(tmp_path / "r1.npy")
  np.testing.assert_allclose(r1.T @ r1, np.eye(256), atol=1e-5)
  assert (tmp_path / "rotation_outliers.png").stat().st_size > 0


def test_quantize_stage_both_scopes(tmp_path):
  r = _run(f"--config.eval_texts={TEST_TEXT}", "--config.seqlen=128", "--config.max_eval_windows=4",
           f"--config.calib_text={TEST_TEXT}", "--config.calib_samples=16", "--config.calib_seqlen=64",
           "--config.aos_epochs=1", "--config.aos_batch_size=8", f"--config.output_dir={tmp_path}",
           "--config.sample_tokens=0", "--config.stages=quantize", "--config.quant_methods=rtn,kmeans,kmeans_pog",
           "--config.quant_bits=w4a16,w4a4", "--config.quant_group_size=32")
  assert r.returncode == 0, r.stderr[-2000:]
  ppl = json.loads((tmp_path / "report.json").read_text())["perplexity"]["wikitext2_valid_excerpt.txt"]
  want = {f"{s}/{m}_{b}" for s in ("official", "full") for m in ("rtn", "kmeans", "kmeans_pog")
          for b in ("w4a16", "w4a4")}
  assert set(ppl) == want
  for scope in ("official", "full"):
    # Learned rotation + K-means codebooks beat plain per-row RTN at W4A4; 4-bit activations cost.
    assert ppl[f"{scope}/kmeans_w4a4"] < ppl[f"{scope}/rtn_w4a4"]
    assert ppl[f"{scope}/rtn_w4a16"] < ppl[f"{scope}/rtn_w4a4"]
    # Column groups of 32 (8 codebooks a row) fit the weights better than one codebook a row.
    assert ppl[f"{scope}/kmeans_pog_w4a16"] < ppl[f"{scope}/rtn_w4a16"]
  # report.md renders the same numbers: one table per scope, a row per method.
  md = (tmp_path / "report.md").read_text()
  for scope in ("official", "full"):
    assert f"**scope `{scope}`**" in md
  assert f"{ppl['full/kmeans_pog_w4a4']:.2f}" in md


def _one_line_error(r, pattern):
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and pattern in last, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_bad_options_give_one_line_errors(tmp_path):
  _one_line_error(_run("--config.stages=eval,cluster", f"--config.output_dir={tmp_path}"),
                  "--config.stages: unknown stage(s) ['cluster']")
  _one_line_error(_run("--config.stages=quantize", "--config.quant_bits=w4", f"--config.output_dir={tmp_path}"),
                  "--config.quant_bits: 'w4' is not like w4a4")
  _one_line_error(_run("--config.stages=quantize", "--config.quant_group_size=0", f"--config.output_dir={tmp_path}"),
                  "--config.quant_group_size: must be at least 2")
  _one_line_error(_run("--config.stages=eval,export", "--config.layer_streaming=True", f"--config.output_dir={tmp_path}"),
                  "--config.layer_streaming: only the export stage streams layers")
  _one_line_error(_run(f"--config.model_path={tmp_path}/none", f"--config.output_dir={tmp_path}"),
                  "model directory not found")
  short = tmp_path / "short.txt"
  short.write_text("too short")
  _one_line_error(_run(f"--config.eval_texts={short}", f"--config.output_dir={tmp_path}"),
                  "short.txt: ")
  assert not os.path.exists(tmp_path / "report.json")


_EXPORT_RUN = (f"--config.eval_texts={TEST_TEXT}", "--config.seqlen=128", "--config.max_eval_windows=4",
               f"--config.calib_text={TEST_TEXT}", "--config.calib_samples=8", "--config.calib_seqlen=32",
               "--config.aos_epochs=1", "--config.aos_batch_size=4", "--config.accf_epochs=1",
               "--config.accf_batch_size=4", "--config.accf_samples=8", "--config.stages=export",
               "--config.sample_tokens=4")


def _export_arrays(out):
  import jax
  import numpy as np

  from cqjax.export import load_quantized
  q = load_quantized(os.path.join(out, "export"))
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(q.params)], q.r1


def test_export_stage_killed_then_resumed_matches_an_uninterrupted_run(tmp_path):
  import signal
  import time

  import numpy as np

  whole, cut = tmp_path / "whole", tmp_path / "cut"
  r = _run(*_EXPORT_RUN, f"--config.output_dir={whole}")
  assert r.returncode == 0, r.stderr[-2000:]
  # Kill the second run in the middle of ACCF (after its second layer's checkpoint).
  p = subprocess.Popen([sys.executable, "-m", "experiments.run", "--config=tiny.py", *_EXPORT_RUN,
                        f"--config.output_dir={cut}"], cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)
  marker = cut / "state" / "export" / "accf" / "layer_001"
  deadline = time.time() + 300
  while not marker.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert marker.exists() and p.poll() is None, "the run ended before it could be killed mid-ACCF"
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  assert not (cut / "export").exists() and not (cut / "state" / "export" / "accf" / "layer_003").exists()
  # Resumed with the weights in host memory (layer streaming): the same export, bit for bit.
  r = _run(*_EXPORT_RUN, f"--config.output_dir={cut}", "--config.layer_streaming=True")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming the run" in r.stdout
  got, got_r1 = _export_arrays(cut)
  want, want_r1 = _export_arrays(whole)
  np.testing.assert_array_equal(got_r1, want_r1)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  report = json.loads((cut / "report.json").read_text())
  key = "export/full/w4a4"
  assert report["perplexity"]["wikitext2_valid_excerpt.txt"][key] == json.loads(
      (whole / "report.json").read_text())["perplexity"]["wikitext2_valid_excerpt.txt"][key]
  assert "quantized" in report["sample"] and "Exported model" in (cut / "report.md").read_text()
  assert (cut / "accf_losses.png").stat().st_size > 0 and (cut / "centroid_histograms.png").stat().st_size > 0
  assert set(report["export"]["history"]["accf"]) == {f"layers_{i}/{b}" for i in range(4)
                                                     for b in ("q_proj", "k_proj", "v_proj", "o_proj", "moe")}
  # A changed setting is refused with what differs, before anything is loaded.
  _one_line_error(_run(*_EXPORT_RUN, f"--config.output_dir={cut}", "--config.export_bits=w3a4"),
                  "export_bits: was 'w4a4', now 'w3a4'")
  # --config.resume=False starts over (its stage kept cheap: the start-over is what is checked).
  r = _run(*_EXPORT_RUN, f"--config.output_dir={cut}", "--config.export_bits=w3a4", "--config.resume=False",
           "--config.stages=eval", "--config.max_eval_windows=1", "--config.sample_tokens=0")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming the run" not in r.stdout and not (cut / "state" / "export").exists()
  assert json.loads((cut / "run_config.json").read_text())["export_bits"] == "w3a4"


def test_rotate_stage_resumed_keeps_its_perplexities(tmp_path):
  args = (f"--config.eval_texts={TEST_TEXT}", "--config.seqlen=128", "--config.max_eval_windows=2",
          f"--config.calib_text={TEST_TEXT}", "--config.calib_samples=8", "--config.calib_seqlen=32",
          "--config.aos_epochs=1", "--config.aos_batch_size=4", "--config.stages=rotate",
          f"--config.output_dir={tmp_path}")
  first = _run(*args)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "learned_rotation_w16a4 ppl" in first.stderr  # the W16A4 evaluations ran
  before = json.loads((tmp_path / "report.json").read_text())
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resuming the run" in again.stdout and "w16a4 ppl" not in again.stderr
  after = json.loads((tmp_path / "report.json").read_text())
  assert after["perplexity"] == before["perplexity"] and "learned_rotation_w16a4" in str(after["perplexity"])


def test_deepseek_checkpoint_through_the_main_job(tmp_path):
  """The trained tiny DeepSeek-V2 reference: quantize (scope full) and export with latent
  attention, shared experts and a dense first layer; the exported model reloads and samples."""
  r = _run(f"--config.model_path={REPO}/experiments/assets/tiny-deepseek-v2-imdb", f"--config.eval_texts={TEST_TEXT}",
           "--config.seqlen=128", "--config.max_eval_windows=4", f"--config.calib_text={TEST_TEXT}",
           "--config.calib_samples=16", "--config.calib_seqlen=64", "--config.aos_epochs=1",
           "--config.aos_batch_size=8", "--config.accf_epochs=1", "--config.accf_samples=16",
           f"--config.output_dir={tmp_path}", "--config.sample_tokens=3", "--config.stages=eval,quantize,export",
           "--config.quant_scopes=full", "--config.quant_methods=rtn,kmeans", "--config.quant_bits=w4a4")
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["model_type"] == "deepseek_v2"
  ppl = report["perplexity"]["wikitext2_valid_excerpt.txt"]
  # W4A4 on 16 calibration windows costs accuracy, yet a wrong rotation or a mis-written latent
  # kernel would take the model towards the 8192-token vocabulary.
  for key in ("full/rtn_w4a4", "full/kmeans_w4a4", "export/full/w4a4"):
    assert ppl["fp"] < ppl[key] < 1.5 * ppl["fp"], (key, ppl)
  assert (tmp_path / "centroid_histograms.png").stat().st_size > 0
