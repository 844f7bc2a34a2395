"""Trains the reference MoE checkpoints (Mixtral and DeepSeek-V2 architectures) on real English
text (IMDB reviews).

Two steps, so the GPU machine needs only token arrays (the raw corpus is larger than what
travels to it):

  # CPU: BPE tokenizer (vocab 8192) trained on the corpus, and the corpora as uint16 tokens.
  python -m experiments.train_reference prepare --data_dir=.refdata
  # GPU: train, write a Hugging Face directory, evaluate it with the perplexity harness.
  python -m experiments.train_reference train --size=tiny --data_dir=.refdata --out=DIR

The output directory holds config.json (model_type mixtral or deepseek_v2), safetensors,
tokenizer files, training_metrics.json and loss_curve.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import time

import numpy as np

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data")
CORPORA = {"train": os.path.join(SHARED, "imdb", "train.txt"),
           "imdb_valid": os.path.join(SHARED, "imdb", "valid.txt"),
           "wikitext2_test": os.path.join(SHARED, "wikitext-2", "wiki.test.tokens")}
VOCAB = 8192


@dataclasses.dataclass(frozen=True)
class ReferenceSize:
  """Architecture and recipe of one reference checkpoint. family "deepseek_v2" adds latent
  attention (kv_lora_rank, RoPE/no-RoPE/value head widths), `shared` shared experts and
  `dense_layers` leading dense layers of width `dense_ffn`, as DeepSeek-V2-Lite has them."""
  layers: int
  hidden: int
  heads: int
  kv_heads: int
  experts: int
  top_k: int
  ffn: int
  steps: int
  batch: int
  seqlen: int = 512
  lr: float = 3e-3
  warmup: int = 200
  weight_decay: float = 0.1
  aux_coef: float = 0.01
  shard_bytes: int = 12 << 20  # the GPU machine returns files of at most 16 MiB
  family: str = "mixtral"
  kv_lora_rank: int = 0
  rope_head_dim: int = 0
  nope_head_dim: int = 0
  v_head_dim: int = 0
  shared: int = 0
  dense_layers: int = 0
  dense_ffn: int = 0

  def hf_config(self) -> dict:
    if self.family == "deepseek_v2":
      return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": VOCAB,
              "hidden_size": self.hidden, "intermediate_size": self.dense_ffn,
              "moe_intermediate_size": self.ffn, "num_hidden_layers": self.layers,
              "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
              "n_routed_experts": self.experts, "num_experts_per_tok": self.top_k,
              "n_shared_experts": self.shared, "first_k_dense_replace": self.dense_layers,
              "q_lora_rank": None, "kv_lora_rank": self.kv_lora_rank, "qk_rope_head_dim": self.rope_head_dim,
              "qk_nope_head_dim": self.nope_head_dim, "v_head_dim": self.v_head_dim,
              "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
              "norm_topk_prob": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
              "rope_theta": 1e4, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "attention_bias": False, "aux_loss_alpha": self.aux_coef}
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
            "hidden_size": self.hidden, "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.hidden // self.heads,
            "num_local_experts": self.experts, "num_experts_per_tok": self.top_k,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e4,
            "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "hidden_act": "silu", "router_aux_loss_coef": self.aux_coef}


SIZES = {
    "tiny": ReferenceSize(layers=4, hidden=256, heads=4, kv_heads=2, experts=8, top_k=2, ffn=192,
                          steps=8000, batch=64),
    # DeepSeek-V2-Lite's design at the tiny size: full-rank queries, a 64-wide KV latent, a dense
    # first layer, 16 routed experts top-4 beside 2 shared ones.
    "tiny_deepseek": ReferenceSize(layers=4, hidden=256, heads=4, kv_heads=4, experts=16, top_k=4, ffn=96,
                                   steps=8000, batch=64, family="deepseek_v2", kv_lora_rank=64,
                                   rope_head_dim=16, nope_head_dim=32, v_head_dim=32, shared=2,
                                   dense_layers=1, dense_ffn=512),
    "small": ReferenceSize(layers=8, hidden=512, heads=8, kv_heads=4, experts=8, top_k=2, ffn=1024,
                           steps=3200, batch=64, lr=2e-3),
    # A few steps of a toy size: how the tests exercise the whole script on CPU.
    "test": ReferenceSize(layers=2, hidden=32, heads=2, kv_heads=1, experts=4, top_k=2, ffn=24,
                          steps=6, batch=4, seqlen=32, warmup=2),
    "test_deepseek": ReferenceSize(layers=2, hidden=32, heads=2, kv_heads=2, experts=4, top_k=2, ffn=16,
                                   steps=6, batch=4, seqlen=32, warmup=2, family="deepseek_v2",
                                   kv_lora_rank=16, rope_head_dim=8, nope_head_dim=8, v_head_dim=8,
                                   shared=1, dense_layers=1, dense_ffn=32),
}


def prepare(data_dir: str, max_train_lines: int = 0, corpora: dict[str, str] = CORPORA) -> None:
  """Trains the tokenizer on `corpora['train']` and writes each corpus as uint16 tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  os.makedirs(data_dir, exist_ok=True)
  with open(corpora["train"], encoding="utf-8") as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  if max_train_lines:
    lines = lines[:max_train_lines]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(lines, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", model_max_length=4096)
  fast.save_pretrained(os.path.join(data_dir, "tokenizer"))
  _portable_tokenizer_config(os.path.join(data_dir, "tokenizer"))
  # Each review is one line: train on them joined by newlines, as the eval files are read.
  enc = tok.encode_batch([l + "\n" for l in lines])
  np.save(os.path.join(data_dir, "train.npy"),
          np.concatenate([np.asarray(e.ids, np.uint16) for e in enc]))
  for name in ("imdb_valid", "wikitext2_test"):
    with open(corpora[name], encoding="utf-8") as f:
      np.save(os.path.join(data_dir, f"{name}.npy"), np.asarray(fast(f.read(), verbose=False)["input_ids"], np.uint16))


def _portable_tokenizer_config(path: str) -> None:
  """The generic class name loads in every transformers release, not only the one that wrote it."""
  tc_path = os.path.join(path, "tokenizer_config.json")
  with open(tc_path) as f:
    tc = json.load(f)
  tc["tokenizer_class"] = "PreTrainedTokenizerFast"
  tc.pop("backend", None)
  with open(tc_path, "w") as f:
    json.dump(tc, f, indent=2)


def load_balancing_loss(router_logits, top_k: int):
  """Switch/Mixtral auxiliary loss: experts * Σ_e (share of routed copies) · (mean router prob);
  equals top_k when routing is uniform."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  _, ids = jax.lax.top_k(probs, top_k)
  routed = jnp.mean(jnp.sum(jax.nn.one_hot(ids, probs.shape[-1]), axis=1), axis=0)
  return probs.shape[-1] * jnp.sum(routed * jnp.mean(probs, axis=0))


def train(size_name: str, data_dir: str, out: str, steps: int = 0, log_every: int = 100,
          seed: int = 0) -> dict:
  """Trains one reference size; writes the Hugging Face directory and metrics to `out`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from cqjax.activation_stats import activation_stats  # pylint: disable=g-import-not-at-top
  from cqjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cqjax.load import load_params  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.perplexity import perplexity  # pylint: disable=g-import-not-at-top
  from cqjax.save_hf import save_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import eval_windows  # pylint: disable=g-import-not-at-top

  size = SIZES[size_name]
  steps = steps or size.steps
  hf_config = size.hf_config()
  cfg = ModelConfig.from_hf_dict(hf_config)
  train_ids = jnp.asarray(np.load(os.path.join(data_dir, "train.npy")).astype(np.int32))

  model = MoeCausalLM(cfg, jnp.bfloat16)  # bf16 compute over float32 master weights
  params = MoeCausalLM(cfg, jnp.float32).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  schedule = optax.warmup_cosine_decay_schedule(0.0, size.lr, size.warmup, steps, size.lr * 0.1)
  decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on norm scales
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=size.weight_decay,
                                mask=decay_mask))
  opt_state = opt.init(params)

  def loss_fn(p, tokens):
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
    (logits, _), state = model.apply({"params": p16}, tokens[:, :-1], mutable=["intermediates"])
    targets = tokens[:, 1:]
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    aux = sum(load_balancing_loss(state["intermediates"][f"layers_{i}"]["moe"]["router_logits"][0], cfg.top_k)
              for i in moe_layers) / len(moe_layers)
    return ce + size.aux_coef * aux, (ce, aux)

  def one_step(carry, key):
    p, s = carry
    starts = jax.random.randint(key, (size.batch,), 0, train_ids.shape[0] - size.seqlen - 1)
    tokens = jax.vmap(lambda st: jax.lax.dynamic_slice(train_ids, (st,), (size.seqlen + 1,)))(starts)
    (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, tokens)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), (ce, aux)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run_steps(p, s, key):
    (p, s), (ce, aux) = jax.lax.scan(one_step, (p, s), jax.random.split(key, log_every))
    return p, s, jnp.mean(ce), jnp.mean(aux)

  key = jax.random.key(seed + 1)
  history = []
  t_start = time.perf_counter()
  t_compiled = None
  for done in range(0, steps, log_every):
    key, sub = jax.random.split(key)
    params, opt_state, ce, aux = run_steps(params, opt_state, sub)
    ce, aux = float(ce), float(aux)
    if t_compiled is None:
      t_compiled = time.perf_counter()
    history.append({"step": done + log_every, "loss": ce, "aux": aux,
                    "elapsed_s": round(time.perf_counter() - t_start, 2)})
    print(f"step {done + log_every}/{steps} loss {ce:.4f} aux {aux:.4f} "
          f"({time.perf_counter() - t_start:.0f}s)", flush=True)
  train_s = time.perf_counter() - t_start
  timed_steps = steps - log_every
  tokens_per_s = (timed_steps * size.batch * size.seqlen / (train_s - (t_compiled - t_start))
                  if timed_steps > 0 else None)

  save_hf_checkpoint(out, cfg, params, hf_config, jnp.bfloat16, size.shard_bytes)
  for f in os.listdir(os.path.join(data_dir, "tokenizer")):
    shutil.copy(os.path.join(data_dir, "tokenizer", f), out)

  # Evaluate what users load: the bf16 files, read back in float32.
  cfg2, eval_params = load_params(out, jnp.float32, progress=False)
  eval_model = MoeCausalLM(cfg2, jnp.float32)
  ppl = {}
  for name in ("imdb_valid", "wikitext2_test"):
    ids = np.load(os.path.join(data_dir, f"{name}.npy")).astype(np.int32)
    ppl[name] = perplexity(eval_model, eval_params, eval_windows(ids, size.seqlen, name), 8,
                           progress=False)
  valid = eval_windows(np.load(os.path.join(data_dir, "imdb_valid.npy")).astype(np.int32), size.seqlen)
  stats = activation_stats(eval_model, eval_params, valid[:64])
  metrics = {"size": size_name, "recipe": dataclasses.asdict(size), "steps": steps,
             "parameters": int(n_params), "train_seconds": round(train_s, 1),
             "train_tokens": steps * size.batch * size.seqlen, "tokens_per_second": tokens_per_s,
             "device": str(jax.devices()[0].device_kind), "history": history, "perplexity": ppl,
             "activation_stats": stats}
  with open(os.path.join(out, "training_metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  plot_loss_curve(out)
  return metrics


def plot_loss_curve(out: str) -> None:
  """loss_curve.png from training_metrics.json (skipped, with a message, without matplotlib)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: loss_curve.png not written")
    return
  with open(os.path.join(out, "training_metrics.json")) as f:
    m = json.load(f)
  steps = [h["step"] for h in m["history"]]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, [h["loss"] for h in m["history"]], label="train cross-entropy")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(f"reference {m['size']}: {m['parameters'] / 1e6:.1f} M parameters")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_curve.png"), dpi=120)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("prepare")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--max_train_lines", type=int, default=0)
  t = sub.add_parser("train")
  t.add_argument("--size", choices=sorted(SIZES), required=True)
  t.add_argument("--data_dir", required=True)
  t.add_argument("--out", required=True)
  t.add_argument("--steps", type=int, default=0, help="0: the size's recipe")
  t.add_argument("--log_every", type=int, default=100)
  t.add_argument("--seed", type=int, default=0)
  pl = sub.add_parser("plot")
  pl.add_argument("--out", required=True)
  args = ap.parse_args()
  if args.cmd == "prepare":
    prepare(args.data_dir, args.max_train_lines)
  elif args.cmd == "train":
    m = train(args.size, args.data_dir, args.out, args.steps, args.log_every, args.seed)
    print(json.dumps({k: m[k] for k in ("parameters", "train_seconds", "tokens_per_second", "perplexity")}))
  else:
    plot_loss_curve(args.out)


if __name__ == "__main__":
  main()
