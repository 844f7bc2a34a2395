"""cqjax: CodeQuant post-training quantization of Mixture-of-Experts models in JAX/Flax."""
from cqjax.export import export_quantized, load_quantized
from cqjax.fuse_projections import fuse_projections
from cqjax.lay_out_bitplanes import lay_out_bitplanes
from cqjax.load import load_params, load_tokenizer
from cqjax.model import MoeCausalLM
from cqjax.quantize import QuantizeConfig, QuantizedModel, quantize

__all__ = ["export_quantized", "fuse_projections", "lay_out_bitplanes", "load_quantized", "load_params", "load_tokenizer", "MoeCausalLM", "QuantizeConfig", "QuantizedModel", "quantize"]
