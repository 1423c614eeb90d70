"""CLI: seed flags map onto the config, YAML + flag precedence, bad values refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kubearch_trainer import cli
from kubearch_trainer.cli import _Parser, add_train_arguments, config_from_args, run_kubearch, run_train
from kubearch_trainer.exit_codes import ExitCode


def parse(argv: list[str]):
    p = _Parser(prog="kubearch-train")
    add_train_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_seed_flags_map_onto_the_config() -> None:
    cfg = parse(
        [
            "--architecture",
            "moe",
            "--stage",
            "code",
            "--model-size",
            "small",
            "--state-size",
            "32",
            "--conv-size",
            "8",
            "--num-experts",
            "4",
            "--expert-capacity",
            "1",
            "--hybrid-local-window",
            "128",
            "--batch-size",
            "2",
            "--gradient-accumulation-steps",
            "4",
            "--use-compile",
            "--use-rmsnorm",
            "--use-rope",
            "--use-amp",
            "--use-gradient-checkpointing",
            "--num-epochs",
            "3",
            "--steps-per-epoch",
            "1000",
            "--learning-rate",
            "5e-5",
            "--warmup-steps",
            "200",
            "--attention",
            "lora_small",
            "--seq-len",
            "512",
            "--eval-every",
            "7",
            "--eval-batches",
            "3",
            "--seed",
            "5",
            "--output-dir",
            "/tmp/x",
            "--resume",
            "--metrics-port",
            "9100",
            "--d-model",
            "128",
            "--n-layers",
            "3",
            "--n-heads",
            "4",
            "--d-ff",
            "256",
            "--log-every",
            "2",
            "--checkpoint-every",
            "9",
            "--device",
            "cpu",
            "--max-consecutive-nans",
            "7",
            "--data",
            "corpus.txt",
        ]
    )
    m, d, t = cfg.model, cfg.data, cfg.training
    assert (m.architecture, m.size, m.state_size, m.conv_size, m.num_experts, m.expert_capacity) == (
        "moe",
        "small",
        32,
        8,
        4,
        1,
    )
    assert (m.hybrid_local_window, m.use_rmsnorm, m.use_rope, m.attention) == (128, True, True, "lora_small")
    assert m.dims == {"d_model": 128, "n_layers": 3, "n_heads": 4, "d_ff": 256}
    assert (t.stage, t.batch_size, t.gradient_accumulation_steps, t.num_epochs, t.steps_per_epoch) == (
        "code",
        2,
        4,
        3,
        1000,
    )
    assert t.use_compile and t.use_amp and t.use_gradient_checkpointing and t.resume
    assert (t.learning_rate, t.warmup_steps, t.eval_every, t.eval_batches, t.seed) == (5e-5, 200, 7, 3, 5)
    assert (t.output_dir, t.metrics_port, t.log_every, t.checkpoint_every, t.device) == (
        "/tmp/x",
        9100,
        2,
        9,
        "cpu",
    )
    assert t.max_consecutive_nans == 7 and t.total_steps == 3000
    assert (d.seq_len, d.path) == (512, "corpus.txt")


def test_defaults_when_no_flag_given() -> None:
    cfg = parse([])
    assert cfg.model.architecture == "dense" and cfg.model.size == "tiny" and not cfg.training.use_amp


def test_yaml_camel_case_and_flags_override_only_when_given(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text(
        "model:\n  architecture: mamba\n  size: small\n  stateSize: 32\n  useRmsnorm: true\n"
        "data:\n  seqLen: 64\n"
        "training:\n  batchSize: 4\n  learningRate: 0.001\n  useAmp: true\n"
        "  regulation:\n    enabled: true\n    varianceThreshold: 0.5\n"
    )
    cfg = parse(["--config", str(f), "--batch-size", "8", "--no-use-amp"])
    assert cfg.model.architecture == "mamba" and cfg.model.size == "small" and cfg.model.state_size == 32
    assert cfg.model.use_rmsnorm is True  # the flag was not given: the YAML value stays
    assert cfg.data.seq_len == 64 and cfg.training.learning_rate == 0.001
    assert cfg.training.batch_size == 8 and cfg.training.use_amp is False  # given flags win
    assert cfg.training.regulation.enabled and cfg.training.regulation.variance_threshold == 0.5


def test_a_training_run_manifest_works_as_config(tmp_path: Path) -> None:
    f = tmp_path / "tr.yaml"
    f.write_text(
        "apiVersion: kubearch.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: x}\n"
        "spec:\n  model: {architecture: dense, size: medium}\n  training: {stepsPerEpoch: 7}\n"
        "  resources: {gpus: 1}\n"
    )
    cfg = parse(["--config", str(f)])
    assert cfg.model.size == "medium" and cfg.training.steps_per_epoch == 7


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--model-size", "huge"], ["model.size", "'huge'", "tiny", "small", "medium", "large"]),
        (["--attention", "fancy"], ["model.attention", "baseline", "lora_small", "bias_only"]),
        (["--architecture", "transformerxl"], ["model.architecture", "dense", "mamba", "moe", "hybrid"]),
        (["--batch-size", "0"], ["training.batch_size", "greater than or equal to 1"]),
        (["--stage", "video"], ["training.stage", "language", "code", "image"]),
        (["--device", "tpu"], ["training.device", "auto", "cpu", "cuda"]),
        (["--batch-size", "many"], ["--batch-size", "invalid int value"]),
        (["--d-model", "100", "--n-heads", "3"], ["model.nHeads", "dModel (100)", "nHeads (3)"]),
    ],
)
def test_bad_values_exit_config_error_before_any_work(
    argv: list[str],
    needles: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubearch_trainer.trainer as trainer

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("training started despite an invalid config")

    monkeypatch.setattr(trainer, "train", no_work)
    out = tmp_path / "out"
    try:
        code = run_train([*argv, "--output-dir", str(out)])
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    assert code == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def test_config_error_reaches_the_termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEARCH_TERMINATION_LOG", str(term))
    assert run_train(["--model-size", "huge"]) == ExitCode.CONFIG_ERROR
    summary = json.loads(term.read_text())
    assert (
        summary["status"] == "config_error"
        and summary["exit_code"] == 64
        and "model.size" in summary["error"]
    )


def test_plugin_module_registers_an_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_plugin_arch.py").write_text(
        "from kubearch_trainer.models import KubearchModel, register\n"
        "@register('cli_test_plugin_arch', task='lm')\n"
        "class P(KubearchModel):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse(["--plugin", "my_plugin_arch", "--architecture", "cli_test_plugin_arch"])
    assert cfg.model.architecture == "cli_test_plugin_arch"
    with pytest.raises(cli.ConfigError, match=r"--plugin.*no_such_module"):
        parse(["--plugin", "no_such_module"])


def test_kubearch_lists_subcommands_and_module_entry_point_runs(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        run_kubearch(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "compare" in out
    proc = subprocess.run(
        [sys.executable, "-m", "kubearch_trainer", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--hybrid-local-window" in proc.stdout and "--config" in proc.stdout


def test_every_field_comes_back_from_its_camel_case_alias(tmp_path: Path) -> None:
    """The operator writes the trainer's config with pydantic's camelCase aliases ("moeZLossWeight")."""
    import yaml
    from kubearch_trainer.config import TrainConfig

    cfg = TrainConfig()
    f = tmp_path / "aliases.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True, exclude_none=True)))
    assert "moeZLossWeight" in f.read_text()
    assert parse(["--config", str(f)]) == cfg


def test_image_and_regulation_flags_land_in_their_nested_fields(tmp_path: Path) -> None:
    f = tmp_path / "reg.yaml"
    f.write_text("training:\n  regulation:\n    lambdaRate: 3.0\n    regulateFfn: false\n")
    cfg = parse(
        [
            "--config",
            str(f),
            "--architecture",
            "vq_vae",
            "--image-size",
            "16",
            "--image-channels",
            "3",
            "--num-classes",
            "5",
            "--latent-dim",
            "6",
            "--beta",
            "2.5",
            "--codebook-size",
            "32",
            "--commitment-cost",
            "0.5",
            "--dead-code-steps",
            "7",
            "--diffusion-timesteps",
            "40",
            "--noise-schedule",
            "cosine",
            "--ddim-steps",
            "4",
            "--dropout",
            "0.2",
            "--regulation",
            "--variance-threshold",
            "0.7",
            "--lambda-variance",
            "1.5",
            "--no-adaptive-schedule",
            "--no-regulate-attention",
            "--no-layer-specific",
            "--regulation-warmup-steps",
            "11",
            "--no-regulate-noise",
            "--no-timestep-dependent",
            "--variance-schedule",
            "constant",
            "--max-variance",
            "0.3",
        ]
    )
    m, r = cfg.model, cfg.training.regulation
    assert (m.architecture, m.image_size, m.image_channels, m.num_classes, m.latent_dim) == (
        "vq_vae",
        16,
        3,
        5,
        6,
    )
    assert (m.beta, m.codebook_size, m.commitment_cost, m.dead_code_steps) == (2.5, 32, 0.5, 7)
    assert (m.diffusion_timesteps, m.noise_schedule, m.ddim_steps, m.dropout) == (40, "cosine", 4, 0.2)
    assert r.enabled and (r.variance_threshold, r.lambda_variance, r.warmup_steps) == (0.7, 1.5, 11)
    assert r.lambda_rate == 3.0 and r.regulate_ffn is False  # from the YAML, not clobbered by flags
    assert not (r.adaptive_schedule or r.regulate_attention or r.layer_specific)
    assert not (r.regulate_noise or r.timestep_dependent)
    assert (r.variance_schedule, r.max_variance) == ("constant", 0.3)
    assert cfg.training.warmup_steps == 10  # --regulation-warmup-steps is not the LR warmup
    assert parse(["--no-regulation"]).training.regulation.enabled is False


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--noise-schedule", "foo"], ["model.noise_schedule", "'foo'", "linear", "cosine"]),
        (
            ["--variance-schedule", "foo"],
            ["training.regulation.variance_schedule", "linear", "cosine", "constant"],
        ),
        (["--variance-threshold", "0"], ["training.regulation.variance_threshold", "greater than 0"]),
    ],
)
def test_bad_image_and_regulation_values_exit_config_error(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert run_train(argv) == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
