"""experiments.profile_decode_step reads the work of a compiled module's entry computation and its
longest chain of dependent launches."""
import jax
import jax.numpy as jnp

from experiments.profile_decode_step import entry_work, longest_chain

_HLO = """HloModule jit_step

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %neg = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: s32[8]) -> (f32[4], s32[3,8]) {
  %a = f32[4]{0} parameter(0)
  %b = s32[8]{0} parameter(1)
  %c = f32[] constant(1)
  %fusion = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation
  %slots = s32[3,8]{1,0} custom-call(%b), custom_call_target="cqjax_cuda_expert_slots", api_version=API_VERSION_TYPED_FFI
  %gemm = (f32[4]{0}, s8[0]{0}) custom-call(%fusion), custom_call_target="__cublas$gemm"
  %gte = f32[4]{0} get-tuple-element(%gemm), index=0
  %copy = f32[4]{0} copy(%gte)
  ROOT %t = (f32[4]{0}, s32[3,8]{1,0}) tuple(%copy, %slots)
}
"""


def test_counts_the_entry_work_by_opcode_and_target():
  assert dict(entry_work(_HLO)) == {"fusion": 1, "custom-call:cqjax_cuda_expert_slots": 1,
                                    "custom-call:__cublas$gemm": 1, "copy": 1}


def test_reads_a_compiled_module():
  text = jax.jit(lambda a, b: (jnp.sin(a) @ b, a + 1)).lower(jnp.ones((3, 4)), jnp.ones((4, 5))).compile().as_text()
  counts = entry_work(text)
  assert sum(counts.values()) >= 1 and not {"parameter", "tuple", "constant"} & set(counts)



def test_longest_chain_follows_data_through_layout_only_instructions():
  # fusion -> gemm -> (get-tuple-element) -> copy is 3 launches; the slots beside them are a chain of 1.
  assert longest_chain(_HLO) == 3
  # A second branch of 4 dependent launches next to it is the longest.
  longer = _HLO.replace("  ROOT %t", "  %n1 = s32[8]{0} negate(%b)\n  %n2 = s32[8]{0} negate(%n1)\n"
                        "  %n3 = s32[8]{0} negate(%n2)\n  %n4 = s32[8]{0} negate(%n3)\n  ROOT %t")
  assert longest_chain(longer) == 4 and sum(entry_work(longer).values()) == 8


def test_a_compile_only_step_takes_abstract_weights_and_the_w4a4_model():
  """--compile_for needs the weights' shapes alone (Mixtral's layers need not fit the host); the
  4-bit model is the one with the activation quantizer (--act_bits)."""
  from experiments.bench_kernels import decode_act, decode_models  # pylint: disable=g-import-not-at-top
  act = decode_act(4)
  cfg, model, q_model, params, quant = decode_models("mixtral-layers", False, act, abstract=True)
  assert cfg.hidden_size == 4096 and model.act_quant is None and q_model.act_quant == act
  leaves = jax.tree.leaves(params) + jax.tree.leaves(quant)
  assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
  assert any(a.dtype == jnp.uint8 for a in jax.tree.leaves(quant))  # packed codes
  # The laid-out setting's params: Mixtral's gate/up (not its 2^24-code q_proj) laid out, still abstract.
  from cqjax.codebook import LaidOutCodebookWeight  # pylint: disable=g-import-not-at-top
  from experiments.bench_kernels import decode_params, decode_settings  # pylint: disable=g-import-not-at-top
  given = decode_params(decode_settings("codebook_w4,codebook_w4_laid_out", 4), params, quant, act)
  assert given["bf16"] is params and given["codebook_w4"] is quant
  laid = given["codebook_w4_laid_out"]["layers_0"]
  assert isinstance(laid["moe"]["gate_proj"], LaidOutCodebookWeight)
  assert not isinstance(laid["attn"]["q_proj"]["kernel"], LaidOutCodebookWeight)
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(given["codebook_w4_laid_out"]))
