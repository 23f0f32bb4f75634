"""GGUF's Q4_0 / Q4_1 / Q8_0 tensors loaded straight into QuantizedWeight, with no re-quantization.

A GGUF quantized matrix is stored row by row (a row is one output feature, ne[0] = K columns), each
row a run of 32-column blocks:

    Q4_0  18 bytes: float16 d, 16 bytes of nibbles      w = (q - 8) * d
    Q4_1  20 bytes: float16 d, float16 m, 16 bytes      w = q * d + m
    Q8_0  34 bytes: float16 d, 32 int8                  w = q * d

Byte j of a 4-bit block holds column j in its low nibble and column j + 16 in its high one, which is
QuantizedWeight's int4 packing, and a block is one group of 32 with a float16 scale (and offset):
the conversion only separates each block's header from its codes, through numpy views of the raw
bytes, and every converted weight dequantizes to the same float32 values as gguf's own dequantize
(the products q * d are exact in float32, so even the rounding of Q4_1's "+ m" is the same).

Tensors of other types (F32 norms, F16, K-quants) have no native twin here; they are dequantized to
float by gguf and copied into the model's parameter, so the model holds exactly the file's weights.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
from gguf.quants import dequantize as gguf_dequantize
from torch import Tensor, nn

from kvlab.errors import ConfigError
from kvlab.models.loader import LoadedModel, load_model
from kvlab.quant.formats import BLOCK, QuantizedWeight
from kvlab.quant.modules import QuantizedEmbedding, QuantizedLinear, replace_module

Q = GGMLQuantizationType


def _q4_0(blocks: np.ndarray) -> QuantizedWeight:
    # No offsets: QuantizedWeight's symmetric int4 means offset = -8 * scale, Q4_0's (q - 8) * d.
    return _weight(codes=blocks[..., 2:18], scales=blocks[..., 0:2], offsets=None, bits=4)


def _q4_1(blocks: np.ndarray) -> QuantizedWeight:
    return _weight(codes=blocks[..., 4:20], scales=blocks[..., 0:2], offsets=blocks[..., 2:4], bits=4)


def _q8_0(blocks: np.ndarray) -> QuantizedWeight:
    return _weight(codes=blocks[..., 2:34], scales=blocks[..., 0:2], offsets=None, bits=8)


NATIVE: dict[GGMLQuantizationType, Callable[[np.ndarray], QuantizedWeight]] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q8_0: _q8_0,
}


def _weight(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, bits: int) -> QuantizedWeight:
    """Blocks (N, blocks, bytes) split into their fields -> a QuantizedWeight with 32-column groups.

    .copy() takes each strided field out of the (read-only, memory-mapped) file into its own
    contiguous array, and the float16 fields are two little-endian bytes per block, which
    .view(float16) reads as GGUF does.
    """
    n, nblocks = codes.shape[:2]
    data = torch.from_numpy(codes.copy().reshape(n, -1))
    if bits == 8:
        data = data.view(torch.int8)

    def half(field: np.ndarray) -> Tensor:
        return torch.from_numpy(field.copy().view(np.float16).reshape(n, nblocks))

    return QuantizedWeight(
        data=data,
        scales=half(scales),
        offsets=None if offsets is None else half(offsets),
        bits=bits,
        group_size=BLOCK,
        in_features=nblocks * BLOCK,
    )


def native_weight(raw: np.ndarray, qtype: GGMLQuantizationType) -> QuantizedWeight:
    """A 2-D GGUF tensor's raw bytes, uint8 (N, bytes per row) as GGUFReader gives them, -> its
    QuantizedWeight. Raises KeyError for a type with no native twin (see NATIVE)."""
    convert = NATIVE[qtype]
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % block_bytes or block_size != BLOCK:
        raise ValueError(
            f"{qtype.name}: expected uint8 (rows, blocks * {block_bytes}), got {raw.dtype} {raw.shape}"
        )
    return convert(raw.reshape(raw.shape[0], -1, block_bytes))


def unpermute_rotary_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of Llama's q / k rows (its converter interleaves each head's two
    rotary halves, for GGML's adjacent-pair rope), as transformers does when it dequantizes
    (LlamaTensorProcessor._reverse_permute_weights): row (h, i, j) of the file, i < half, j < 2,
    becomes row (h, j, i). Whole rows move, so this applies to a quantized tensor's raw bytes as to
    its float values: a row's blocks (codes, scale and offset) stay together and intact."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def apply_gguf_weights(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Put the weights of the GGUF file at `path` into `model` (the model transformers builds from
    it), in place: every Q4_0 / Q4_1 / Q8_0 matrix of an nn.Linear or nn.Embedding becomes a
    QuantizedLinear / QuantizedEmbedding holding the file's blocks; every other tensor is
    dequantized and copied into its parameter. A tied LM head shares the embedding's weight.
    Returns how many tensors of each GGUF type were placed."""
    reader = GGUFReader(path)
    architecture = _field(reader, "general.architecture")
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise ConfigError(f"{path}: gguf does not know the architecture {architecture!r}")
    config = model.config
    name_map = get_tensor_name_map(arch, config.num_hidden_layers)
    owners = {}  # GGUF tensor name -> (HF module name, parameter name)
    for module_name, module in model.named_modules():
        base = name_map.get_name(module_name) if module_name else None
        if base is not None:
            for param_name, _ in module.named_parameters(recurse=False):
                owners[f"{base}.{param_name}"] = (module_name, param_name)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    placed: dict[str, int] = {}
    swaps, native = [], set()
    with torch.no_grad():
        for tensor in reader.tensors:
            if tensor.name not in owners:
                continue
            module_name, param_name = owners[tensor.name]
            module = model.get_submodule(module_name)
            if tied and module is head:
                continue
            heads = _permuted_heads(architecture, tensor.name, config)
            raw = tensor.data if heads is None else unpermute_rotary_rows(tensor.data, heads)
            if (
                tensor.tensor_type in NATIVE
                and param_name == "weight"
                and type(module) in (nn.Linear, nn.Embedding)
            ):
                qweight = native_weight(raw, tensor.tensor_type)
                _check_shape(tensor.name, qweight.shape, module.weight.shape)
                swaps.append((module_name, module, qweight.to(module.weight.device)))
                native.add(tensor.tensor_type.name.lower())
            else:
                weights = torch.tensor(gguf_dequantize(raw, tensor.tensor_type))
                parameter = getattr(module, param_name)
                _check_shape(tensor.name, weights.shape, parameter.shape)
                parameter.copy_(weights)
            placed[tensor.tensor_type.name] = placed.get(tensor.tensor_type.name, 0) + 1
        for module_name, module, qweight in swaps:
            if isinstance(module, nn.Embedding):
                replace_module(model, module_name, QuantizedEmbedding(qweight, module.weight.dtype))
                if tied:
                    replace_module(model, _name_of(model, head), QuantizedLinear(qweight, head.bias))
            else:
                replace_module(model, module_name, QuantizedLinear(qweight, module.bias))
    config.kvlab_quantization = "-".join(["gguf", *sorted(native)])
    return placed


def _field(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ConfigError(f"GGUF file lacks the field {key}")
    return field.contents()


def _permuted_heads(architecture: str, name: str, config) -> int | None:
    """The head count by which a tensor's rows were permuted (Llama's q and k), else None."""
    if architecture != "llama":
        return None
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


def _check_shape(name: str, got, expected) -> None:
    if tuple(got) != tuple(expected):
        raise ConfigError(f"GGUF tensor {name} is {tuple(got)}, the model expects {tuple(expected)}")


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def load_gguf_quantized(name: str, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """A GGUF model (registry name or .gguf path) at its shipped precision: load_model(native_quant=True)."""
    return load_model(name, dtype=dtype, device=device, native_quant=True)
