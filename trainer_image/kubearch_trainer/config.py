"""The trainer's configuration: one pydantic model shared by the CLI, YAML files and the operator.

Why here and why so plain: the operator builds the TrainingRun CRD schema from these classes and
validates specs with them, so this module must import neither torch nor kopf. Every field has a
camelCase alias (the Kubernetes convention: ``nprocPerNode``) and accepts its snake_case name too,
so the same YAML works as a trainer ``--config`` file and as a TrainingRun's ``spec``.

An invalid value fails here, before any work starts, with a message that names the field and the
allowed values (see :func:`format_validation_error`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# --------------------------------------------------------------------------------------------
# Vocabularies. Kept as tuples so the CLI (choices=...), the CRD (enum) and the validators agree.
# --------------------------------------------------------------------------------------------
SEQUENCE_ARCHITECTURES = ("dense", "mamba", "moe", "hybrid")
VAE_ARCHITECTURES = ("vae", "beta_vae", "vq_vae", "hierarchical_vae")
DIFFUSION_ARCHITECTURES = ("ddpm", "latent_diffusion")
RECURRENT_ARCHITECTURES = ("lstm", "gru", "rnn")
IMAGE_CLASSIFIER_ARCHITECTURES = ("cnn",)
BUILTIN_ARCHITECTURES: tuple[str, ...] = (
    SEQUENCE_ARCHITECTURES
    + VAE_ARCHITECTURES
    + DIFFUSION_ARCHITECTURES
    + IMAGE_CLASSIFIER_ARCHITECTURES
    + RECURRENT_ARCHITECTURES
)
#: Names added at run time by plugins (``kubearch_trainer.models.registry.register``). The CRD
#: only knows the built-in names; a plugin needs its own trainer image anyway.
PLUGIN_ARCHITECTURES: set[str] = set()
#: A well-formed architecture name (every built-in matches): what the API server can check of a
#: plugin's name, which only the trainer (after importing the plugin) can resolve.
ARCHITECTURE_PATTERN = r"^[a-z][a-z0-9_]*$"
#: A dotted Python module name (``my_pkg.bigram``), importable in the trainer image.
PLUGIN_MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"

#: Options that only one group of families reads: a TrainingRun that sets one for another family
#: is refused (the trainer ignores them; the operator and the CRD's CEL rules name the field).
FAMILY_OPTIONS: dict[str, tuple[str, ...]] = {
    "num_experts": ("moe",),
    "expert_capacity": ("moe",),
    "moe_aux_loss_weight": ("moe",),
    "moe_z_loss_weight": ("moe",),
    "state_size": ("mamba", "hybrid"),
    "conv_size": ("mamba", "hybrid"),
    "expand": ("mamba", "hybrid"),
    "hybrid_local_window": ("hybrid",),
    "hybrid_attention_every": ("hybrid",),
    "latent_dim": (*VAE_ARCHITECTURES, "latent_diffusion"),
    "beta": ("beta_vae",),
    "codebook_size": ("vq_vae",),
    "commitment_cost": ("vq_vae",),
    "dead_code_steps": ("vq_vae",),
    "diffusion_timesteps": DIFFUSION_ARCHITECTURES,
    "noise_schedule": DIFFUSION_ARCHITECTURES,
    "ddim_steps": DIFFUSION_ARCHITECTURES,
    "image_size": (*VAE_ARCHITECTURES, *DIFFUSION_ARCHITECTURES, *IMAGE_CLASSIFIER_ARCHITECTURES),
    "image_channels": (*VAE_ARCHITECTURES, *DIFFUSION_ARCHITECTURES, *IMAGE_CLASSIFIER_ARCHITECTURES),
    "num_classes": IMAGE_CLASSIFIER_ARCHITECTURES,
}

MODEL_SIZES = ("tiny", "small", "medium", "large")
ATTENTION_VARIANTS = (
    "baseline",
    "lora_small",
    "lora_medium",
    "lora_large",
    "enhanced_small",
    "enhanced_medium",
    "enhanced_large",
    "rope_only",
    "bias_only",
)
STAGES = ("language", "code", "image")

#: The search report's sizes (d_model, n_layers, n_heads, d_ff). Other seeds' sizes are reached
#: with explicit --d-model/--n-layers/--n-heads/--d-ff (see the README's size table).
SIZE_TABLE: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024},
    "small": {"d_model": 384, "n_layers": 6, "n_heads": 6, "d_ff": 1536},
    "medium": {"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 2048},
    "large": {"d_model": 768, "n_layers": 10, "n_heads": 12, "d_ff": 3072},
}

#: (base channels, depth) per size. VAE depth = stride-2 down-sampling stages of the encoder;
#: diffusion depth = U-Net resolution levels; CNN depth = residual blocks (the model guide's
#: small 64ch/4, medium 128ch/6, large 256ch/8); recurrent: hidden size and stacked layers (the
#: model guide's small 256/2, medium 512/4, large 1024/4). ``tiny`` is a CI-sized row below them.
FAMILY_SIZE_TABLE: dict[str, dict[str, tuple[int, int]]] = {
    "vae": {"tiny": (16, 2), "small": (32, 3), "medium": (64, 3), "large": (128, 4)},
    "diffusion": {"tiny": (16, 2), "small": (32, 2), "medium": (64, 3), "large": (128, 3)},
    "cnn": {"tiny": (16, 2), "small": (64, 4), "medium": (128, 6), "large": (256, 8)},
    "recurrent": {"tiny": (128, 2), "small": (256, 2), "medium": (512, 4), "large": (1024, 4)},
}


def family_dims(cfg: ModelConfig, family: str) -> tuple[int, int]:
    """(width, depth) for ``family``: the size preset unless ``d_model``/``n_layers`` are set."""
    width, depth = FAMILY_SIZE_TABLE[family][cfg.size]
    if cfg.d_model is not None:
        width = int(cfg.d_model)
    if cfg.n_layers is not None:
        depth = int(cfg.n_layers)
    return width, depth


#: LoRA ranks (query/key rank, value/output rank) per attention variant (search report).
LORA_RANKS: dict[str, tuple[int, int]] = {
    "lora_small": (32, 64),
    "lora_medium": (64, 128),
    "lora_large": (128, 256),
    "enhanced_small": (32, 64),
    "enhanced_medium": (64, 128),
    "enhanced_large": (128, 256),
}


class _Section(BaseModel):
    """Base for every config section: camelCase aliases, snake_case accepted, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


class ModelConfig(_Section):
    """What to build. Sizes follow the search report; explicit dimensions override the preset."""

    # ``plugin`` comes before ``architecture``: the architecture's validator reads it.
    plugin: str | None = Field(
        None,
        max_length=200,
        pattern=PLUGIN_MODULE_PATTERN,
        description="Python module importable in the trainer image (my_pkg.bigram) that registers "
        "the architecture; the trainer imports it first (passed as --plugin).",
    )
    architecture: str = Field(
        "dense",
        max_length=63,
        pattern=ARCHITECTURE_PATTERN,
        description="Model family: a built-in architecture, or one that model.plugin registers.",
    )
    size: Literal["tiny", "small", "medium", "large"] = Field(
        "tiny",
        description="Size preset (search report): tiny 256d/4L, small 384d/6L, "
        "medium 512d/8L, large 768d/10L.",
    )
    d_model: int | None = Field(None, ge=8, le=65536, description="Overrides the preset's model width.")
    n_layers: int | None = Field(None, ge=1, le=1024, description="Overrides the preset's depth.")
    n_heads: int | None = Field(None, ge=1, le=1024, description="Overrides the preset's attention heads.")
    d_ff: int | None = Field(
        None, ge=8, le=1_048_576, description="Overrides the preset's feed-forward width."
    )
    vocab_size: int = Field(
        256, ge=2, le=1_048_576, description="Vocabulary size; 256 for the byte-level tokenizer."
    )
    max_seq_len: int = Field(
        4096, ge=8, le=1_048_576, description="Longest sequence the position tables support."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    # dense transformer
    attention: Literal[
        "baseline",
        "lora_small",
        "lora_medium",
        "lora_large",
        "enhanced_small",
        "enhanced_medium",
        "enhanced_large",
        "rope_only",
        "bias_only",
    ] = Field("baseline", description="Attention variant of the search report.")
    use_rmsnorm: bool = Field(False, description="RMSNorm instead of LayerNorm.")
    use_rope: bool = Field(False, description="Rotary position embeddings instead of absolute ones.")
    position_embedding: Literal["learned", "sinusoidal"] = Field(
        "learned", description="Absolute positions used when RoPE is off."
    )
    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="Feed-forward type.")
    tie_embeddings: bool = True

    # mamba / hybrid
    state_size: int = Field(16, ge=1, le=256, description="SSM state size N.")
    conv_size: int = Field(4, ge=1, le=64, description="Depthwise causal conv kernel width.")
    expand: int = Field(2, ge=1, le=8, description="Mamba inner expansion factor.")
    hybrid_local_window: int = Field(
        256, ge=1, le=1_048_576, description="Sliding-window size of hybrid attention."
    )
    hybrid_attention_every: int = Field(
        2, ge=1, le=1024, description="Every k-th hybrid layer is local attention, the rest Mamba."
    )

    # moe
    num_experts: int = Field(8, ge=1, le=256)
    expert_capacity: int = Field(
        2, ge=1, le=256, description="Experts per token (top-k), as the seed names it."
    )
    moe_aux_loss_weight: float = Field(
        1e-2, ge=0.0, le=100.0, description="Switch load-balancing loss weight."
    )
    moe_z_loss_weight: float = Field(1e-3, ge=0.0, le=100.0, description="Router z-loss weight.")

    # image / latent families (issue 3)
    image_size: int = Field(32, ge=8, le=4096, description="Square image side for image families.")
    image_channels: int = Field(1, ge=1, le=4)
    num_classes: int = Field(10, ge=2, le=1_000_000, description="Classes for the CNN classifier.")
    latent_dim: int = Field(16, ge=1, le=65536, description="VAE latent size.")
    beta: float = Field(4.0, ge=0.0, le=10_000.0, description="beta_vae KL weight.")
    codebook_size: int = Field(128, ge=2, le=1_048_576, description="vq_vae codebook entries.")
    commitment_cost: float = Field(0.25, ge=0.0, le=100.0)
    dead_code_steps: int = Field(
        100,
        ge=1,
        le=1_000_000_000,
        description="vq_vae: re-initialise a code unused for this many training steps.",
    )
    diffusion_timesteps: int = Field(1000, ge=2, le=100_000)
    noise_schedule: Literal["linear", "cosine"] = "linear"
    ddim_steps: int = Field(50, ge=1, le=100_000)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str, info: ValidationInfo) -> str:
        # With a plugin named, any well-formed name passes: the module registers it only inside
        # the trainer, which then refuses a name it does not register (exit 64). Without one, the
        # name must be known here (built-in, or registered by a plugin already imported).
        if info.data.get("plugin"):
            return value
        allowed = (*BUILTIN_ARCHITECTURES, *sorted(PLUGIN_ARCHITECTURES))
        if value not in allowed:
            raise ValueError(
                f"{value!r} is not one of {', '.join(allowed)} (or set model.plugin to the module "
                "that registers it)"
            )
        return value

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        problems: list[tuple[str, str]] = []
        if self.architecture in ("dense", "moe", "hybrid"):
            d, h = self.resolved("d_model"), self.resolved("n_heads")
            if d % h:
                problems.append(("nHeads", f"dModel ({d}) must be divisible by nHeads ({h})"))
        if self.architecture == "moe" and self.expert_capacity > self.num_experts:
            problems.append(
                (
                    "expertCapacity",
                    f"{self.expert_capacity} must be <= numExperts ({self.num_experts}): "
                    "each token picks that many distinct experts",
                )
            )
        if problems:
            raise FieldErrors(problems)
        return self

    def resolved(self, name: str) -> int:
        """Dimension ``name`` after applying the size preset and any explicit override."""
        value = getattr(self, name)
        return int(value) if value is not None else SIZE_TABLE[self.size][name]

    @property
    def dims(self) -> dict[str, int]:
        return {k: self.resolved(k) for k in ("d_model", "n_layers", "n_heads", "d_ff")}


class DataConfig(_Section):
    """Where batches come from. With no ``path`` a small built-in data set is generated offline."""

    path: str | None = Field(
        None, max_length=4096, description="Text file, folder of .txt files, JSONL, image folder or .npz."
    )
    format: Literal["auto", "text", "jsonl", "folder", "images", "npz"] = "auto"
    dataset: str | None = Field(
        None,
        max_length=128,
        description="Built-in generated data set when no path is given (per task; see README).",
    )
    jsonl_field: str = Field("text", max_length=256, description="JSONL key holding the text.")
    tokenizer: Literal["byte"] = Field("byte", description="Byte-level tokenizer, no download needed.")
    seq_len: int = Field(256, ge=2, le=1_048_576, description="Tokens per training sequence.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.9)
    num_workers: int = Field(0, ge=0, le=256)


class RegulationConfig(_Section):
    """The seeds' "2π" variance regulation, with exactly the seed's keys (see README for the formula)."""

    enabled: bool = False
    variance_threshold: float | None = Field(None, gt=0.0, le=1e6)
    lambda_variance: float | None = Field(None, ge=0.0, le=1e9)
    lambda_rate: float | None = Field(None, ge=0.0, le=1e9)
    adaptive_schedule: bool = True
    # transformers
    regulate_attention: bool = True
    regulate_ffn: bool = True
    layer_specific: bool = True
    warmup_steps: int | None = Field(None, ge=0, le=1_000_000_000)
    # diffusion
    regulate_noise: bool = True
    timestep_dependent: bool = True
    variance_schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_variance: float = Field(0.1, gt=0.0, le=1e6)


class TrainingConfig(_Section):
    """How to train: the seed's flags plus evaluation, checkpointing and metrics."""

    stage: Literal["language", "code", "image"] = "language"
    num_epochs: int = Field(1, ge=1, le=100_000)
    steps_per_epoch: int = Field(100, ge=1, le=1_000_000_000)
    batch_size: int = Field(16, ge=1, le=1_048_576, description="Per-process micro-batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    learning_rate: float = Field(3e-4, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a fraction of the peak.")
    warmup_steps: int = Field(10, ge=0, le=1_000_000_000)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.95, gt=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, le=1e6, description="Max global grad norm; 0 disables clipping.")
    use_amp: bool = Field(False, description="Mixed precision (bf16 autocast on GPU).")
    use_compile: bool = Field(False, description="torch.compile the model.")
    use_gradient_checkpointing: bool = False
    eval_every: int = Field(
        50, ge=0, le=1_000_000_000, description="Evaluate every N optimizer steps; 0 only at the end."
    )
    eval_batches: int = Field(10, ge=1, le=1_000_000)
    log_every: int = Field(10, ge=1, le=1_000_000_000)
    checkpoint_every: int = Field(
        0, ge=0, le=1_000_000_000, description="Checkpoint every N steps; 0 only at the end."
    )
    max_consecutive_nans: int = Field(
        5, ge=1, le=1_000_000, description="Stop after this many non-finite losses in a row."
    )
    seed: int = Field(1337, ge=0, le=2**32 - 1, description="numpy accepts seeds below 2^32.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = Field("runs/default", min_length=1, max_length=4096)
    resume: bool = Field(False, description="Continue from the latest checkpoint in output_dir.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve Prometheus metrics here.")
    metrics_all_ranks: bool = Field(False, description="Every rank serves metrics (port + local rank).")
    regulation: RegulationConfig = Field(default_factory=RegulationConfig)

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.steps_per_epoch


class TrainConfig(_Section):
    """A whole trainer configuration; the same three sections as a TrainingRun's spec."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        problems = trainer_cross_checks(self.model, self.data, self.training)
        if problems:
            raise FieldErrors(problems)
        return self

    def dump(self) -> dict[str, Any]:
        """Plain dict with snake_case keys (what checkpoints and results.json record)."""
        return self.model_dump(mode="json")


def trainer_cross_checks(
    model: ModelConfig, data: DataConfig, training: TrainingConfig
) -> list[tuple[str, str]]:
    """Rules across the trainer's sections, as (camelCase path, message) pairs.

    Shared by :class:`TrainConfig` and the operator's ``TrainingRunSpec`` (which mirrors the
    API server's CEL rules of the same names), so both name the field the same way.
    """
    del training  # no rule of the trainer's own spans training yet; kept for one signature
    problems = []
    if data.seq_len > model.max_seq_len:
        problems.append(("data.seqLen", f"{data.seq_len} exceeds model.maxSeqLen ({model.max_seq_len})"))
    return problems


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the allowed values."""


class FieldErrors(ValueError):
    """Raised by a model validator: (path, message) pairs, the path camelCase and relative to the
    validated model, so :func:`format_validation_error` names the field (``spec.data.seqLen``)
    rather than the section that holds the rule."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))
        self.problems = problems


#: Regular expressions in words, for messages (registered by the modules that use them).
PATTERN_DESCRIPTIONS: dict[str, str] = {
    ARCHITECTURE_PATTERN: f"one of {', '.join(BUILTIN_ARCHITECTURES)}, or a plugin's architecture "
    "(lowercase letters, digits and _, starting with a letter)",
    PLUGIN_MODULE_PATTERN: "a dotted Python module name (my_pkg.bigram)",
}

#: pydantic error types whose message is clearer with the offending value (shortened) after it.
_ECHO_INPUT = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "string_pattern_mismatch",
        "string_too_long",
        "string_too_short",
        "finite_number",
    }
)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """Turn pydantic's error into lines like ``model.size: 'huge' is not one of tiny, small, ...``.

    Locations are the keys as written (camelCase in a TrainingRun, as the API server reports
    them); rules across fields name the field they are about (:class:`FieldErrors`).
    """
    lines = []
    for item in err.errors():
        parts = [p for p in item["loc"] if p != "__root__"]
        is_key = bool(parts) and parts[-1] == "[key]"  # a dict's key, not its value, is wrong
        if is_key:
            parts = parts[:-1]
        loc = ""
        for part in parts:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, FieldErrors):
            for path, msg in cause.problems:
                full = f"{loc}.{path}" if loc else path
                lines.append(f"{prefix}{full}: {msg}")
            continue
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "config")
        msg = item["msg"]
        if item["type"] == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            msg = f"{item['input']!r} is not one of {expected.replace(' or ', ', ')}"
        elif item["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif item["type"] == "string_pattern_mismatch" and item["ctx"]["pattern"] in PATTERN_DESCRIPTIONS:
            shown = repr(item["input"])
            shown = shown if len(shown) <= 60 else shown[:50] + "..."
            msg = f"must be {PATTERN_DESCRIPTIONS[item['ctx']['pattern']]} (got {shown})"
        elif item["type"] in _ECHO_INPUT:
            shown = repr(item["input"])
            msg = f"{msg} (got {shown if len(shown) <= 60 else shown[:50] + '...'})"
        lines.append(f"{where}: {'key ' if is_key else ''}{msg}")
    return "\n".join(lines)


def load_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a nested dict (YAML or a TrainingRun spec) into a :class:`TrainConfig`.

    Raises :class:`ConfigError` with one line per problem.
    """
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_yaml_mapping(path: str | Path, flag: str, expected: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file named by ``flag`` (``--config``, ``-f``).

    One reader for the trainer's ``--config`` and ``kubearch search -f``: a missing file, bad YAML
    or a file that is not a mapping (it must hold ``expected``) is a :class:`ConfigError` naming
    the flag and the path.
    """
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{flag}: {str(p)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag}: {str(p)!r} is not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{flag}: {str(p)!r} must hold {expected}")
    return raw
