"""The seed's GPU matrix as a pure function: (dataset size, model type) -> run shape.

Source: ``seeds/000_*.txt`` ("Architecture Selection Matrix"). Its *Quick Selection Guide* picks the
GPUs from the dataset size; its *Detailed Architecture Matrix* gives each model type its own GPU
need; its *GPU Configuration Guide* gives each of the three shapes a batch size, gradient
accumulation and mixed precision. The shape a run gets is the larger of the two needs:

=================  ==========================  ===============================
dataset samples    Quick Selection Guide row   shape
=================  ==========================  ===============================
< 100K             VAE/AE, 1x 3090             single: 1 node x 1 GPU
100K - 1M          VAE/Transformer, 1x 3090    single: 1 node x 1 GPU
1M - 10M           Large VAE, 4x 3090          multi: 1 node x 4 GPUs
> 10M              Distributed, 8x 3090/5090   distributed: 2 nodes x 4 GPUs
=================  ==========================  ===============================

Model types (detailed matrix): VAE and beta-VAE 1 GPU; VQ-VAE 2, DDPM 2, latent diffusion 2 and
hierarchical VAE 4 (2 is not one of the three shapes, so it rounds *up* to 4: never fewer GPUs than
the seed asks for); transformer-like families by estimated parameters: < 100M 1 GPU ("Small"),
100M - 1B 4 GPUs ("Medium"), >= 1B 8 GPUs ("Large"/"XL", multi-node), counted exactly by the
trainer's ``flops.count_params``. Families the seed does not
list (CNN, LSTM/GRU/RNN, Mamba, MoE, hybrid) are sized by their parameter count like transformers.

Batch semantics (chosen so that every shape lands inside the Quick Selection Guide's batch range):
the matrix's ``batch_size`` (128 / 512 / 2048) is what all processes together see per forward pass,
so each torchrun process gets ``batch_size / world_size`` (128, 128, 256) as its micro-batch, and an
optimizer step sees ``batch_size x gradient_accumulation`` samples (512, 1024, 2048). The seed sets
``mixed_precision: true`` for the single GPU and recommends it for speed in general; every shape
uses it. The distributed shape gives no accumulation, so it is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubearch_trainer.config import BUILTIN_ARCHITECTURES, ModelConfig
from kubearch_trainer.flops import count_params

#: Quick Selection Guide boundaries, in samples.
SMALL_DATASET = 100_000
MEDIUM_DATASET = 1_000_000
LARGE_DATASET = 10_000_000
#: Transformer table boundaries, in parameters.
SMALL_MODEL = 100_000_000
LARGE_MODEL = 1_000_000_000


@dataclass(frozen=True)
class Shape:
    """One of the GPU Configuration Guide's three set-ups."""

    name: str
    nodes: int
    gpus_per_node: int
    batch_size: int  # over all processes, per forward pass
    gradient_accumulation_steps: int
    mixed_precision: bool

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def micro_batch(self) -> int:
        """Per-process micro-batch (the trainer's ``training.batchSize``)."""
        return max(1, self.batch_size // self.gpus)


SINGLE = Shape(
    "single", nodes=1, gpus_per_node=1, batch_size=128, gradient_accumulation_steps=4, mixed_precision=True
)
MULTI = Shape(
    "multi", nodes=1, gpus_per_node=4, batch_size=512, gradient_accumulation_steps=2, mixed_precision=True
)
DISTRIBUTED = Shape(
    "distributed",
    nodes=2,
    gpus_per_node=4,
    batch_size=2048,
    gradient_accumulation_steps=1,
    mixed_precision=True,
)
SHAPES = (SINGLE, MULTI, DISTRIBUTED)

#: Detailed matrix GPU needs of the families the seed lists by name (before rounding to a shape).
FAMILY_GPUS = {"vae": 1, "beta_vae": 1, "vq_vae": 2, "hierarchical_vae": 4, "ddpm": 2, "latent_diffusion": 2}


@dataclass(frozen=True)
class MatrixChoice:
    shape: Shape
    reason: str


def shape_for_gpus(gpus: int) -> Shape:
    """The smallest of the three shapes with at least ``gpus`` GPUs (8+ -> distributed)."""
    for shape in SHAPES:
        if shape.gpus >= gpus:
            return shape
    return DISTRIBUTED


def dataset_shape(samples: int | None) -> tuple[Shape, str]:
    """Quick Selection Guide row for a data set of ``samples`` (unknown counts as the smallest row)."""
    if samples is None:
        return SINGLE, "dataset size unknown (resources.datasetSamples unset): row '< 100K samples' -> 1 GPU"
    if samples < SMALL_DATASET:
        return SINGLE, f"dataset {samples:,} samples: row '< 100K samples' -> 1 GPU"
    if samples < MEDIUM_DATASET:
        return SINGLE, f"dataset {samples:,} samples: row '100K-1M samples' -> 1 GPU"
    if samples <= LARGE_DATASET:
        return MULTI, f"dataset {samples:,} samples: row '1M-10M samples' -> 4 GPUs"
    return DISTRIBUTED, f"dataset {samples:,} samples: row '> 10M samples' -> 8 GPUs (2 nodes x 4)"


def model_parameters(model: ModelConfig) -> int:
    """The model's exact parameter count (every expert of a MoE), for the transformer size bands.

    The trainer's own analytic count (``kubearch_trainer.flops.count_params``), which its tests
    compare with built models: a rough estimate put dense ``large`` (74.1M) at 94.6M, and a
    band edge (100M, 1B) is exactly where such an error picks the wrong shape.
    """
    return count_params(model).total


def model_shape(model: ModelConfig) -> tuple[Shape, str]:
    """Detailed-matrix GPU need of a model, rounded up to one of the three shapes."""
    arch = model.architecture
    if arch not in BUILTIN_ARCHITECTURES:
        # A plugin's architecture (model.plugin): its code lives only in the trainer image, so the
        # operator cannot count its parameters; the model row adds nothing to the dataset's.
        return SINGLE, (
            f"model {arch} (plugin {model.plugin}): size unknown to the operator -> 1 GPU by the "
            "model row; set resources.auto: false with nodes/gpusPerNode for more"
        )
    if arch in FAMILY_GPUS:
        need = FAMILY_GPUS[arch]
        shape = shape_for_gpus(need)
        rounded = "" if shape.gpus == need else f", rounded up to {shape.gpus}"
        return shape, f"model {arch}: detailed matrix {need}x GPU{rounded}"
    params = model_parameters(model)
    if params < SMALL_MODEL:
        band, shape = "Small (<100M)", SINGLE
    elif params < LARGE_MODEL:
        band, shape = "Medium (100M-1B)", MULTI
    else:
        band, shape = "Large (>=1B)", DISTRIBUTED
    gpus = f"{shape.gpus} GPU{'s' if shape.gpus > 1 else ''}"
    return shape, f"model {arch} {params / 1e6:.1f}M params: transformer row {band} -> {gpus}"


def choose(samples: int | None, model: ModelConfig) -> MatrixChoice:
    """The GPU matrix: the larger of the dataset's and the model's shape, with the reason in words."""
    by_data, data_reason = dataset_shape(samples)
    by_model, model_reason = model_shape(model)
    shape = by_data if by_data.gpus >= by_model.gpus else by_model
    return MatrixChoice(
        shape,
        f"{data_reason}; {model_reason} => {shape.name}: "
        f"{shape.nodes} node(s) x {shape.gpus_per_node} GPU(s), "
        f"batch {shape.batch_size} ({shape.micro_batch}/process), accumulation "
        f"{shape.gradient_accumulation_steps}, mixed precision {'on' if shape.mixed_precision else 'off'}",
    )
