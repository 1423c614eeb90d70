"""Invalid TrainingRun specs, each with the field the refusal must name (issue 9, "Bad input").

One table for two layers: ``tests/unit/test_bad_input.py`` checks that the operator's pydantic
models refuse every case naming the field, and ``tests/integration/test_bad_input_api.py`` that
the real API server (schema + CEL) refuses the ones marked ``SCHEMA`` the same way, before any
operator sees them. ``OPERATOR`` marks what the schema cannot express, so only the operator's
``SpecValid=False`` catches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubearch_operator.api import TrainingRunSpec

SCHEMA, OPERATOR = "schema", "operator"
MB = "x" * 1_000_000  # a 1 MB string: ConfigMap/pod/annotation size limits


@dataclass(frozen=True)
class Bad:
    id: str
    spec: dict[str, Any]
    field: str  # as the API server names it: spec.resources.gpuType
    layer: str = SCHEMA


def _res(**kw: Any) -> dict[str, Any]:
    return {"resources": kw}


def _tol(**kw: Any) -> dict[str, Any]:
    return {"resources": {"tolerations": [kw]}}


CASES: list[Bad] = [
    # --- enums and types ---------------------------------------------------------------------
    Bad("size-huge", {"model": {"size": "huge"}}, "spec.model.size"),
    Bad("arch-unknown", {"model": {"architecture": "transformer-xl"}}, "spec.model.architecture"),
    # well-formed but not built in, and no model.plugin to register it: CEL refuses it
    Bad("arch-unknown-no-plugin", {"model": {"architecture": "transformer_xl"}}, "spec.model.architecture"),
    Bad(
        "plugin-not-a-module",
        {"model": {"architecture": "bigram", "plugin": "my-pkg/bigram.py"}},
        "spec.model.plugin",
    ),
    Bad("plugin-too-long", {"model": {"architecture": "bigram", "plugin": "p" * 201}}, "spec.model.plugin"),
    Bad("attention-unknown", {"model": {"attention": "flash"}}, "spec.model.attention"),
    Bad("clean-pod-policy", {"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "spec.runPolicy.cleanPodPolicy"),
    Bad("device-tpu", {"training": {"device": "tpu"}}, "spec.training.device"),
    Bad("pull-policy", _res(imagePullPolicy="Sometimes"), "spec.resources.imagePullPolicy"),
    Bad("stage", {"training": {"stage": "video"}}, "spec.training.stage"),
    Bad("unknown-field", {"model": {"layers": 3}}, "spec.model.layers"),
    Bad("string-for-int", {"training": {"batchSize": "big"}}, "spec.training.batchSize"),
    # --- lower bounds ------------------------------------------------------------------------
    Bad("lr-zero", {"training": {"learningRate": 0}}, "spec.training.learningRate"),
    Bad("batch-zero", {"training": {"batchSize": 0}}, "spec.training.batchSize"),
    Bad("nodes-zero", _res(nodes=0), "spec.resources.nodes"),
    Bad("seq-len-one", {"data": {"seqLen": 1}}, "spec.data.seqLen"),
    Bad("backoff-negative", {"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    Bad("seed-negative", {"training": {"seed": -1}}, "spec.training.seed"),
    Bad("dropout-one", {"model": {"dropout": 1.0}}, "spec.model.dropout"),
    # --- absurd numbers (sane maxima) --------------------------------------------------------
    Bad("weight-decay-1e308", {"training": {"weightDecay": 1e308}}, "spec.training.weightDecay"),
    Bad("grad-clip-1e308", {"training": {"gradClip": 1e308}}, "spec.training.gradClip"),
    Bad("epochs-1e18", {"training": {"numEpochs": 10**18}}, "spec.training.numEpochs"),
    Bad("steps-1e18", {"training": {"stepsPerEpoch": 10**18}}, "spec.training.stepsPerEpoch"),
    Bad("backoff-1e9", {"runPolicy": {"backoffLimit": 10**9}}, "spec.runPolicy.backoffLimit"),
    Bad("seq-len-1e9", {"data": {"seqLen": 10**9}, "model": {"maxSeqLen": 10**9}}, "spec.data.seqLen"),
    Bad("max-seq-len-1e9", {"model": {"maxSeqLen": 10**9}}, "spec.model.maxSeqLen"),
    Bad("lr-2", {"training": {"learningRate": 2.0}}, "spec.training.learningRate"),
    Bad("d-model-1e6", {"model": {"dModel": 10**6}}, "spec.model.dModel"),
    Bad("layers-1e5", {"model": {"nLayers": 10**5}}, "spec.model.nLayers"),
    Bad("vocab-1e9", {"model": {"vocabSize": 10**9}}, "spec.model.vocabSize"),
    Bad("batch-1e9", {"training": {"batchSize": 10**9}}, "spec.training.batchSize"),
    Bad(
        "accum-1e9",
        {"training": {"gradientAccumulationSteps": 10**9}},
        "spec.training.gradientAccumulationSteps",
    ),
    Bad("warmup-1e12", {"training": {"warmupSteps": 10**12}}, "spec.training.warmupSteps"),
    Bad("seed-2e32", {"training": {"seed": 2**32}}, "spec.training.seed"),
    Bad("gpus-100", _res(gpusPerNode=100), "spec.resources.gpusPerNode"),
    Bad("nodes-1000", _res(nodes=1000), "spec.resources.nodes"),
    Bad(
        "deadline-1e12",
        {"runPolicy": {"activeDeadlineSeconds": 10**12}},
        "spec.runPolicy.activeDeadlineSeconds",
    ),
    Bad(
        "ttl-1e12",
        {"runPolicy": {"ttlSecondsAfterFinished": 10**12}},
        "spec.runPolicy.ttlSecondsAfterFinished",
    ),
    Bad("workers-1e6", {"data": {"numWorkers": 10**6}}, "spec.data.numWorkers"),
    Bad("master-port-70000", _res(masterPort=70000), "spec.resources.masterPort"),
    Bad("metrics-port-70000", {"training": {"metricsPort": 70000}}, "spec.training.metricsPort"),
    Bad(
        "min-available-1000",
        {"runPolicy": {"schedulingPolicy": {"schedulerName": "volcano", "minAvailable": 1000}}},
        "spec.runPolicy.schedulingPolicy.minAvailable",
    ),
    Bad(
        "toleration-seconds-1e12",
        _tol(key="k", operator="Exists", effect="NoExecute", tolerationSeconds=10**12),
        "spec.resources.tolerations[0].tolerationSeconds",
    ),
    # --- strings the API server would refuse on a child object -------------------------------
    Bad("gpu-type-blank", _res(gpuType="A100 80GB"), "spec.resources.gpuType"),
    Bad("gpu-type-64", _res(gpuType="a" * 64), "spec.resources.gpuType"),
    Bad("gpu-type-label", _res(gpuTypeLabel="nvidia.com/gpu product"), "spec.resources.gpuTypeLabel"),
    Bad("gpu-type-label-empty", _res(gpuTypeLabel=""), "spec.resources.gpuTypeLabel"),
    Bad("node-selector-key", _res(nodeSelector={"bad key!": "x"}), "spec.resources.nodeSelector"),
    Bad(
        "pod-template-label-key-long",
        {"podTemplate": {"metadata": {"labels": {"k" * 400: "v"}}}},
        "spec.podTemplate.metadata.labels",
    ),
    Bad(
        "pod-template-annotation-key-long",
        {"podTemplate": {"metadata": {"annotations": {"k" * 400: "v"}}}},
        "spec.podTemplate.metadata.annotations",
    ),
    Bad("node-selector-value", _res(nodeSelector={"zone": "eu west"}), "spec.resources.nodeSelector.zone"),
    Bad("image-empty", _res(image=""), "spec.resources.image"),
    Bad("image-blank", _res(image="   "), "spec.resources.image"),
    Bad("image-space", _res(image="ghcr.io/x/y: latest"), "spec.resources.image"),
    Bad("claim-uppercase", _res(checkpointClaim="My_Claim"), "spec.resources.checkpointClaim"),
    Bad("claim-slash", _res(checkpointClaim="a/b"), "spec.resources.checkpointClaim"),
    Bad(
        "priority-class",
        {"runPolicy": {"schedulingPolicy": {"priorityClass": "High Priority"}}},
        "spec.runPolicy.schedulingPolicy.priorityClass",
    ),
    Bad(
        "scheduler-name",
        {"runPolicy": {"schedulingPolicy": {"schedulerName": "My Scheduler"}}},
        "spec.runPolicy.schedulingPolicy.schedulerName",
    ),
    Bad("cpu-quantity", _res(cpu="lots"), "spec.resources.cpu"),
    Bad("memory-quantity", _res(memory="32 GB"), "spec.resources.memory"),
    Bad("shm-quantity", _res(shmSize="2 GiB"), "spec.resources.shmSize"),
    Bad(
        "toleration-exists-value",
        _tol(key="k", operator="Exists", value="v"),
        "spec.resources.tolerations[0].value",
    ),
    Bad(
        "toleration-empty-key-equal",
        _tol(operator="Equal", value="v"),
        "spec.resources.tolerations[0].operator",
    ),
    Bad(
        "toleration-seconds-noschedule",
        _tol(key="k", operator="Exists", effect="NoSchedule", tolerationSeconds=5),
        "spec.resources.tolerations[0].tolerationSeconds",
    ),
    Bad("toleration-key", _tol(key="bad key", operator="Exists"), "spec.resources.tolerations[0].key"),
    Bad("toleration-value", _tol(key="k", value="bad value"), "spec.resources.tolerations[0].value"),
    Bad(
        "node-selector-65",
        _res(nodeSelector={f"k{i}": "v" for i in range(65)}),
        "spec.resources.nodeSelector",
    ),
    Bad(
        "tolerations-65",
        {"resources": {"tolerations": [{"key": f"k{i}", "operator": "Exists"} for i in range(65)]}},
        "spec.resources.tolerations",
    ),
    # --- 1 MB strings --------------------------------------------------------------------------
    Bad("mb-data-path", {"data": {"path": MB}}, "spec.data.path"),
    Bad("mb-dataset", {"data": {"dataset": MB}}, "spec.data.dataset"),
    Bad("mb-jsonl-field", {"data": {"jsonlField": MB}}, "spec.data.jsonlField"),
    Bad("mb-output-dir", {"training": {"outputDir": MB}}, "spec.training.outputDir"),
    Bad("mb-image", _res(image=MB), "spec.resources.image"),
    Bad("mb-gpu-type", _res(gpuType=MB), "spec.resources.gpuType"),
    Bad(
        "mb-queue",
        {"runPolicy": {"schedulingPolicy": {"schedulerName": "volcano", "queue": MB}}},
        "spec.runPolicy.schedulingPolicy.queue",
    ),
    Bad("output-dir-empty", {"training": {"outputDir": ""}}, "spec.training.outputDir"),
    # --- contradictions (CEL) ------------------------------------------------------------------
    Bad("seq-len-over-max", {"data": {"seqLen": 8192}, "model": {"maxSeqLen": 1024}}, "spec.data.seqLen"),
    Bad(
        "hybrid-window-over-seq",
        {"model": {"architecture": "hybrid", "hybridLocalWindow": 512}, "data": {"seqLen": 256}},
        "spec.model.hybridLocalWindow",
    ),
    Bad("nproc-over-gpus", _res(nodes=1, gpusPerNode=2, nprocPerNode=4), "spec.resources.nprocPerNode"),
    Bad("nproc-over-default-gpu", _res(nprocPerNode=2), "spec.resources.nprocPerNode"),
    Bad(
        "cuda-without-gpus",
        {"training": {"device": "cuda"}, "resources": {"gpusPerNode": 0}},
        "spec.training.device",
    ),
    Bad(
        "warmup-over-steps",
        {"training": {"warmupSteps": 500, "numEpochs": 1, "stepsPerEpoch": 100}},
        "spec.training.warmupSteps",
    ),
    Bad("metrics-port-is-master-port", {"training": {"metricsPort": 29500}}, "spec.training.metricsPort"),
    Bad(
        "metrics-port-is-custom-master-port",
        {"training": {"metricsPort": 9000}, "resources": {"masterPort": 9000}},
        "spec.training.metricsPort",
    ),
    Bad("auto-with-nodes", _res(auto=True, nodes=2), "spec.resources"),
    Bad("experts-on-dense", {"model": {"architecture": "dense", "numExperts": 4}}, "spec.model.numExperts"),
    Bad("top-k-on-dense", {"model": {"expertCapacity": 1}}, "spec.model.expertCapacity"),
    Bad("vae-beta-on-dense", {"model": {"beta": 2.0}}, "spec.model.beta"),
    Bad("latent-on-dense", {"model": {"latentDim": 8}}, "spec.model.latentDim"),
    Bad("codebook-on-vae", {"model": {"architecture": "vae", "codebookSize": 64}}, "spec.model.codebookSize"),
    Bad("state-on-dense", {"model": {"stateSize": 8}}, "spec.model.stateSize"),
    Bad(
        "window-on-mamba",
        {"model": {"architecture": "mamba", "hybridLocalWindow": 64}},
        "spec.model.hybridLocalWindow",
    ),
    Bad(
        "timesteps-on-cnn",
        {"model": {"architecture": "cnn", "diffusionTimesteps": 10}},
        "spec.model.diffusionTimesteps",
    ),
    Bad("classes-on-vae", {"model": {"architecture": "vae", "numClasses": 3}}, "spec.model.numClasses"),
    Bad("image-size-on-dense", {"model": {"imageSize": 64}}, "spec.model.imageSize"),
    Bad(
        "queue-without-scheduler",
        {"runPolicy": {"schedulingPolicy": {"queue": "q"}}},
        "spec.runPolicy.schedulingPolicy.queue",
    ),
    Bad(
        "min-available-without-scheduler",
        {"runPolicy": {"schedulingPolicy": {"minAvailable": 2}}},
        "spec.runPolicy.schedulingPolicy.minAvailable",
    ),
    # --- only the operator can tell ------------------------------------------------------------
    Bad("heads-do-not-divide", {"model": {"dModel": 100, "nHeads": 3}}, "spec.model.nHeads", OPERATOR),
    Bad(
        "top-k-over-experts",
        {"model": {"architecture": "moe", "numExperts": 2, "expertCapacity": 3}},
        "spec.model.expertCapacity",
        OPERATOR,
    ),
    Bad(
        "preset-heads-do-not-divide", {"model": {"size": "small", "nHeads": 5}}, "spec.model.nHeads", OPERATOR
    ),
]

#: Valid specs near the edges: the rules above must not refuse them.
GOOD: list[dict[str, Any]] = [
    {},
    {"model": {"architecture": "moe", "numExperts": 4, "expertCapacity": 2}},
    {"model": {"architecture": "hybrid", "hybridLocalWindow": 256}, "data": {"seqLen": 256}},
    {"resources": {"gpusPerNode": 0, "nprocPerNode": 4}, "training": {"device": "cpu"}},
    {"resources": {"nodes": 2, "gpusPerNode": 8, "nprocPerNode": 8, "gpuType": "NVIDIA-A100-SXM4-80GB"}},
    {"resources": {"tolerations": [{"operator": "Exists"}, {"key": "a", "operator": "Equal", "value": "b"}]}},
    {"resources": {"nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"}, "checkpointClaim": "ckpt"}},
    {"training": {"warmupSteps": 100, "numEpochs": 1, "stepsPerEpoch": 100, "metricsPort": 9090}},
    {"runPolicy": {"schedulingPolicy": {"priorityClass": "high"}}},
    {"runPolicy": {"schedulingPolicy": {"schedulerName": "volcano", "queue": "q", "minAvailable": 2}}},
    {"model": {"architecture": "vq_vae", "codebookSize": 64, "latentDim": 8, "imageSize": 16}},
    # a plugin's architecture: only the trainer, after importing the module, can resolve the name
    {"model": {"architecture": "bigram", "plugin": "my_pkg.bigram"}},
]

#: Whole dumps (every default written out, as model_dump and the search's reports do) are valid:
#: the "chosen" rules ignore options that equal their default.
GOOD += [
    TrainingRunSpec.model_validate(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
    for spec in (
        {},
        {"model": {"architecture": "cnn"}},
        {"data": {"seqLen": 32}, "training": {"stepsPerEpoch": 3}},
    )
]
