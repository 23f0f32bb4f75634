"""Weight and KV-cache quantization (issue 12): formats, quantizers, the module swap, kernels' front end."""

from kvlab.quant.formats import QuantizedWeight, QuantSpec
from kvlab.quant.linear import quantized_embedding, quantized_linear
from kvlab.quant.modules import QuantizedEmbedding, QuantizedLinear, is_quantized, quantize_model
from kvlab.quant.rtn import quantize_weight

__all__ = [
    "QuantSpec",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedWeight",
    "is_quantized",
    "quantize_model",
    "quantize_weight",
    "quantized_embedding",
    "quantized_linear",
]
