"""The trainer's command-line flags and how they become a validated :class:`TrainConfig`.

Why a module of its own: ``kubearch-train``, ``kubearch compare`` and the shared trial runner all
validate trainer flags before starting a process; keeping the flag table here lets them do so
without importing ``cli`` (which imports them for its subcommands): no import cycle.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags actually given. Every flag defaults
to "not given" (``argparse.SUPPRESS``) so a flag never silently overrides the YAML with its own
default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from kubearch_trainer.config import (
    PLUGIN_MODULE_PATTERN,
    ConfigError,
    TrainConfig,
    load_config,
    load_yaml_mapping,
)
from kubearch_trainer.exit_codes import ExitCode

S = argparse.SUPPRESS
#: Nested sections are dotted: their flags land in ``data["training"]["regulation"]``.
_REG = "training.regulation"

#: (flag, section, field, type, help). ``bool`` flags take ``--x`` / ``--no-x``.
_FLAGS: tuple[tuple[str, str, str, Any, str], ...] = (
    # the seed's flags
    (
        "--architecture",
        "model",
        "architecture",
        str,
        "dense | mamba | moe | hybrid | image families | plugins",
    ),
    ("--stage", "training", "stage", str, "language | code | image"),
    ("--model-size", "model", "size", str, "tiny | small | medium | large (search report sizes)"),
    ("--state-size", "model", "state_size", int, "Mamba state size N"),
    ("--conv-size", "model", "conv_size", int, "Mamba depthwise conv width"),
    ("--num-experts", "model", "num_experts", int, "MoE experts"),
    ("--expert-capacity", "model", "expert_capacity", int, "MoE experts per token (top-k)"),
    ("--hybrid-local-window", "model", "hybrid_local_window", int, "hybrid sliding-window size"),
    ("--batch-size", "training", "batch_size", int, "per-process micro-batch size"),
    (
        "--gradient-accumulation-steps",
        "training",
        "gradient_accumulation_steps",
        int,
        "micro-batches per step",
    ),
    ("--use-compile", "training", "use_compile", bool, "torch.compile the model"),
    ("--use-rmsnorm", "model", "use_rmsnorm", bool, "RMSNorm instead of LayerNorm"),
    ("--use-rope", "model", "use_rope", bool, "rotary position embeddings"),
    ("--use-amp", "training", "use_amp", bool, "bf16 autocast on GPU"),
    ("--use-gradient-checkpointing", "training", "use_gradient_checkpointing", bool, "recompute activations"),
    ("--num-epochs", "training", "num_epochs", int, "epochs (total steps = epochs x steps per epoch)"),
    ("--steps-per-epoch", "training", "steps_per_epoch", int, "optimizer steps per epoch"),
    ("--learning-rate", "training", "learning_rate", float, "peak learning rate"),
    ("--warmup-steps", "training", "warmup_steps", int, "linear warmup steps"),
    # kubearch's own
    (
        "--attention",
        "model",
        "attention",
        str,
        "attention variant (baseline, lora_*, enhanced_*, rope_only, bias_only)",
    ),
    ("--d-model", "model", "d_model", int, "override the size preset's width"),
    ("--n-layers", "model", "n_layers", int, "override the preset's depth"),
    ("--n-heads", "model", "n_heads", int, "override the preset's heads"),
    ("--d-ff", "model", "d_ff", int, "override the preset's feed-forward width"),
    ("--max-seq-len", "model", "max_seq_len", int, "longest sequence the position tables support"),
    ("--seq-len", "data", "seq_len", int, "tokens per training sequence"),
    ("--data", "data", "path", str, "text file, folder of .txt, JSONL, image folder or .npz"),
    ("--data-format", "data", "format", str, "auto | text | jsonl | folder | images | npz"),
    ("--jsonl-field", "data", "jsonl_field", str, "JSONL key holding the text"),
    ("--dataset", "data", "dataset", str, "built-in generated data set when --data is not given"),
    ("--eval-every", "training", "eval_every", int, "evaluate every N steps (0: only at the end)"),
    ("--eval-batches", "training", "eval_batches", int, "validation batches per evaluation"),
    ("--log-every", "training", "log_every", int, "log line every N steps"),
    (
        "--checkpoint-every",
        "training",
        "checkpoint_every",
        int,
        "checkpoint every N steps (0: only at the end)",
    ),
    (
        "--max-consecutive-nans",
        "training",
        "max_consecutive_nans",
        int,
        "abort after N non-finite losses in a row",
    ),
    ("--seed", "training", "seed", int, "random seed"),
    ("--device", "training", "device", str, "auto | cpu | cuda"),
    ("--output-dir", "training", "output_dir", str, "checkpoints and results.json go here"),
    ("--resume", "training", "resume", bool, "continue from output-dir's checkpoint when there is one"),
    ("--metrics-port", "training", "metrics_port", int, "serve Prometheus metrics on this port"),
    ("--metrics-all-ranks", "training", "metrics_all_ranks", bool, "every rank serves (port + local rank)"),
    ("--dropout", "model", "dropout", float, "dropout probability (0 disables)"),
    # image families (VAE, diffusion, CNN)
    ("--image-size", "model", "image_size", int, "square image side"),
    ("--image-channels", "model", "image_channels", int, "1 (grey) .. 4"),
    ("--num-classes", "model", "num_classes", int, "classes of the image classifiers"),
    ("--latent-dim", "model", "latent_dim", int, "VAE latent size (VQ-VAE: code vector size)"),
    ("--beta", "model", "beta", float, "beta_vae KL weight"),
    ("--codebook-size", "model", "codebook_size", int, "vq_vae codebook entries"),
    ("--commitment-cost", "model", "commitment_cost", float, "vq_vae commitment loss weight"),
    ("--dead-code-steps", "model", "dead_code_steps", int, "vq_vae: restart a code unused this many steps"),
    ("--diffusion-timesteps", "model", "diffusion_timesteps", int, "diffusion steps T"),
    ("--noise-schedule", "model", "noise_schedule", str, "diffusion beta schedule: linear | cosine"),
    ("--ddim-steps", "model", "ddim_steps", int, "DDIM sampling steps"),
    # 2π regulation (training.regulation)
    ("--regulation", _REG, "enabled", bool, "enable the 2π variance regulariser"),
    ("--variance-threshold", _REG, "variance_threshold", float, "τ (default: the family's seed row)"),
    ("--lambda-variance", _REG, "lambda_variance", float, "λ_var (default: the family's seed row)"),
    ("--lambda-rate", _REG, "lambda_rate", float, "λ_rate (default: the family's seed row)"),
    ("--adaptive-schedule", _REG, "adaptive_schedule", bool, "scale λ_var by clamp(EMA/τ, 1, 10)"),
    ("--regulate-attention", _REG, "regulate_attention", bool, "sequence models: hook the token mixers"),
    ("--regulate-ffn", _REG, "regulate_ffn", bool, "sequence models: hook the feed-forward blocks"),
    ("--layer-specific", _REG, "layer_specific", bool, "one term (and EMA) per hooked module"),
    (
        "--regulation-warmup-steps",
        _REG,
        "warmup_steps",
        int,
        "linear ramp of the regulariser (default: seed row)",
    ),
    ("--regulate-noise", _REG, "regulate_noise", bool, "diffusion: regulate the predicted noise"),
    ("--timestep-dependent", _REG, "timestep_dependent", bool, "diffusion: threshold grows with t"),
    (
        "--variance-schedule",
        _REG,
        "variance_schedule",
        str,
        "diffusion threshold g(t): linear | cosine | constant",
    ),
    ("--max-variance", _REG, "max_variance", float, "diffusion: largest threshold increase over τ"),
)


_SEED_FLAGS = frozenset(f[0] for f in _FLAGS[:19])
_IMAGE_FIELDS = frozenset(
    (
        "image_size",
        "image_channels",
        "num_classes",
        "latent_dim",
        "beta",
        "codebook_size",
        "commitment_cost",
        "dead_code_steps",
        "diffusion_timesteps",
        "noise_schedule",
        "ddim_steps",
    )
)


class _Parser(argparse.ArgumentParser):
    """Argument errors are configuration errors too: exit CONFIG_ERROR, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.CONFIG_ERROR), f"{self.prog}: config error: {message}\n")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (shared by ``kubearch-train`` and ``kubearch train``)."""
    parser.add_argument(
        "--config", metavar="FILE.yaml", default=S, help="YAML with model/data/training sections"
    )
    parser.add_argument(
        "--plugin",
        metavar="MODULE",
        action="append",
        default=S,
        help="import MODULE first (it registers extra architectures); repeatable",
    )
    seed = parser.add_argument_group("the seed's flags (Architecture Comparison Guide)")
    own = parser.add_argument_group("kubearch flags")
    image = parser.add_argument_group("image families (VAE, diffusion, CNN)")
    reg = parser.add_argument_group(
        "2π regulation (training.regulation; defaults: the seed's table per family)"
    )
    for flag, section, field, typ, help_ in _FLAGS:
        if flag in _SEED_FLAGS:
            group = seed
        elif section == _REG:
            group = reg
        elif field in _IMAGE_FIELDS:
            group = image
        else:
            group = own
        dest = f"{section}__{field}"
        if typ is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=S, help=help_)
        else:
            metavar = {int: "N", float: "X"}.get(typ, field.upper())
            group.add_argument(flag, dest=dest, type=typ, default=S, metavar=metavar, help=help_)


def _snake(key: str) -> str:
    # Split before a capital that follows a lowercase letter/digit, and inside a run of capitals before
    # the last one ("moeZLossWeight" -> "moe_z_loss_weight", pydantic's camelCase of moe_z_loss_weight).
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", key).lower()


def _snake_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {_snake(str(k)): _snake_keys(v) for k, v in obj.items()}
    return obj


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """The nested config of a YAML file (a TrainingRun manifest contributes its ``spec``)."""
    raw = load_yaml_mapping(path, "--config", "a mapping with model/data/training sections")
    if "spec" in raw and isinstance(raw["spec"], dict):  # a TrainingRun manifest
        raw = {k: v for k, v in raw["spec"].items() if k in ("model", "data", "training")}
    return _snake_keys(raw)


def import_plugins(modules: Sequence[str], source: str = "--plugin") -> None:
    """Import plugin modules (their ``@register`` runs); the working directory is importable.

    ``source`` names where the module came from in the error (``--plugin`` or ``model.plugin``).
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{source}: cannot import {name!r} ({err})") from None


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """defaults < YAML < given flags, validated; raises :class:`ConfigError` naming the field."""
    args = vars(ns)
    import_plugins(args.get("plugin", []))
    data: dict[str, Any] = read_yaml_config(args["config"]) if "config" in args else {}
    # The config's model.plugin (a TrainingRun's spec.model.plugin) is imported like --plugin, and
    # before validation, so that the architecture check sees what it registers. A malformed name
    # is left to the validator, which names the field and the expected form.
    model_sec = data.get("model")
    plugin = model_sec.get("plugin") if isinstance(model_sec, dict) else None
    well_formed = isinstance(plugin, str) and re.fullmatch(PLUGIN_MODULE_PATTERN, plugin)
    if well_formed and plugin not in args.get("plugin", []):
        import_plugins([plugin], source="model.plugin")
    for dest, value in args.items():
        if "__" not in dest:
            continue
        section, field = dest.split("__", 1)
        sec: Any = data
        path: list[str] = []
        for part in section.split("."):  # "training.regulation" -> data["training"]["regulation"]
            path.append(part)
            sec = sec.setdefault(part, {}) if isinstance(sec, dict) else None
            if not isinstance(sec, dict):
                raise ConfigError(f"{'.'.join(path)}: must be a mapping")
        sec[field] = value
    # A sequence longer than the position tables would be refused; grow them unless set explicitly.
    model, dsec = data.get("model", {}), data.get("data", {})
    if isinstance(model, dict) and isinstance(dsec, dict) and "max_seq_len" not in model:
        seq = dsec.get("seq_len")
        if isinstance(seq, int) and seq > 4096:
            model["max_seq_len"] = seq
    cfg = load_config(data)
    _check_architecture_available(cfg)
    return cfg


def _check_architecture_available(cfg: TrainConfig) -> None:
    """A name the config knows may still lack an implementation in this image: refuse it up front."""
    from kubearch_trainer.models import available_architectures
    from kubearch_trainer.models.registry import plugin_architectures

    names = available_architectures()
    if cfg.model.architecture in names:
        return
    plugin = cfg.model.plugin
    if plugin:
        own = plugin_architectures(plugin)
        raise ConfigError(
            f"model.architecture: {cfg.model.architecture!r} is not registered by model.plugin "
            f"{plugin!r} (it registers: {', '.join(own) or 'nothing'}); "
            f"available in this trainer: {', '.join(names)}"
        )
    raise ConfigError(
        f"model.architecture: {cfg.model.architecture!r} is not available in this trainer; "
        f"one of {', '.join(names)}"
    )
