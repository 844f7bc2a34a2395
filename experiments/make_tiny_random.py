"""Writes the embedded default checkpoint: a tiny *random* Mixtral in Hugging Face format.

It stands in until a checkpoint trained on real text exists. The tokenizer is a byte-level BPE
trained by `tokenizers` on the given text file. Run once; the output is committed:

  python -m experiments.make_tiny_random --text ../shared/data/wikitext-2/wiki.valid.tokens \
      --out experiments/assets/tiny-random-mixtral
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 2048,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "torch_dtype": "float32",
}


def random_tensors(c: dict, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  d, f, v, e = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
  q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
  w = lambda *s: (0.02 * rng.standard_normal(s)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(v, d), "lm_head.weight": w(v, d),
       "model.norm.weight": np.ones(d, np.float32)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": np.ones(d, np.float32),
          p + "post_attention_layernorm.weight": np.ones(d, np.float32),
          p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
          p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
          p + "block_sparse_moe.gate.weight": w(e, d)}
    for x in range(e):
      t |= {f"{p}block_sparse_moe.experts.{x}.w1.weight": w(f, d),
            f"{p}block_sparse_moe.experts.{x}.w3.weight": w(f, d),
            f"{p}block_sparse_moe.experts.{x}.w2.weight": w(d, f)}
  return t


def train_tokenizer(text_file: str, vocab_size: int) -> PreTrainedTokenizerFast:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train([text_file], trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--text", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "config.json"), "w") as f:
    json.dump(CONFIG, f, indent=2)
  save_file(random_tensors(CONFIG, args.seed), os.path.join(args.out, "model.safetensors"),
            metadata={"format": "pt"})
  tokenizer = train_tokenizer(args.text, CONFIG["vocab_size"])
  tokenizer.model_max_length = CONFIG["max_position_embeddings"]
  tokenizer.save_pretrained(args.out)
  # The generic class name loads in every transformers release, not only the one that wrote it.
  tc_path = os.path.join(args.out, "tokenizer_config.json")
  with open(tc_path) as f:
    tc = json.load(f)
  tc["tokenizer_class"] = "PreTrainedTokenizerFast"
  tc.pop("backend", None)
  with open(tc_path, "w") as f:
    json.dump(tc, f, indent=2)


if __name__ == "__main__":
  main()
