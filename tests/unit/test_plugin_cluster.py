"""Plugins in a cluster (issue 10): ``spec.model.plugin`` names the module that registers the
architecture; the config accepts a plugin's name, the trainer imports the module from the config
and refuses (exit 64) a name it does not register, and that reason reaches the run's status.

The plugin is the README's example, ``examples/plugins/my_pkg/bigram.py`` (registers ``bigram``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubearch_operator.builders import CONTAINER
from kubearch_operator.status import classify_failure, pod_view
from kubearch_trainer.cli import run_train
from kubearch_trainer.config import BUILTIN_ARCHITECTURES, PLUGIN_ARCHITECTURES, ConfigError, load_config
from kubearch_trainer.exit_codes import ExitCode
from kubearch_trainer.models import registry

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "examples" / "plugins"


def _config(tmp_path: Path, architecture: str, plugin: str = "my_pkg.bigram") -> Path:
    """A TrainingRun manifest used as the trainer's config (what the operator's ConfigMap holds)."""
    doc = {
        "apiVersion": "kubearch.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "bigram"},
        "spec": {
            "model": {"plugin": plugin, "architecture": architecture, "vocabSize": 256},
            "data": {"seqLen": 32},
            "training": {
                "stepsPerEpoch": 3,
                "batchSize": 4,
                "evalEvery": 0,
                "evalBatches": 1,
                "device": "cpu",
                "outputDir": str(tmp_path / "out"),
            },
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def in_plugin_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the trainer in-process from examples/plugins (its working directory is importable),
    then forget the plugin: registry entries and modules, so each test imports it afresh."""
    monkeypatch.chdir(PLUGINS)
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield
    for name in [n for n, cls in registry._REGISTRY.items() if cls.__module__.startswith("my_pkg")]:
        registry._REGISTRY.pop(name)
        PLUGIN_ARCHITECTURES.discard(name)
    for mod in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[mod]


# --- the config --------------------------------------------------------------------------------
def test_a_plugin_lets_the_config_accept_a_name_it_does_not_know_yet() -> None:
    assert "bigram" not in PLUGIN_ARCHITECTURES  # nothing has registered it in this process
    cfg = load_config({"model": {"architecture": "bigram", "plugin": "my_pkg.bigram"}})
    assert (cfg.model.architecture, cfg.model.plugin) == ("bigram", "my_pkg.bigram")


def test_without_a_plugin_an_unknown_name_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"model": {"architecture": "bigram"}})
    message = str(info.value)
    assert message.startswith("model.architecture: 'bigram' is not one of")
    assert all(a in message for a in BUILTIN_ARCHITECTURES) and "model.plugin" in message


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"architecture": "bigram", "plugin": "my-pkg.bigram"}, "model.plugin"),
        ({"architecture": "bigram", "plugin": "my_pkg/bigram.py"}, "model.plugin"),
        ({"architecture": "bigram", "plugin": "my_pkg..bigram"}, "model.plugin"),
        ({"architecture": "bigram", "plugin": ""}, "model.plugin"),
        ({"architecture": "bigram", "plugin": "m" * 201}, "model.plugin"),
        ({"architecture": "Bigram-2", "plugin": "my_pkg.bigram"}, "model.architecture"),
        ({"architecture": "b" * 64, "plugin": "my_pkg.bigram"}, "model.architecture"),
    ],
)
def test_malformed_plugin_and_architecture_names_are_refused(model: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        load_config({"model": model})


# --- the trainer -------------------------------------------------------------------------------
def test_kubearch_train_imports_the_configs_plugin_and_trains(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), str(PLUGINS)])}
    proc = subprocess.run(
        [sys.executable, "-m", "kubearch_trainer", "--config", str(_config(tmp_path, "bigram"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["status"], results["architecture"], results["steps"]) == ("completed", "bigram", 3)
    assert results["parameters"]["total"] == 256 * 256  # the bigram table, not a built-in model


def test_an_architecture_the_plugin_does_not_register_exits_64_and_fails_the_run(
    tmp_path: Path, in_plugin_dir: None, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEARCH_TERMINATION_LOG", str(term))
    code = run_train(["--config", str(_config(tmp_path, "trigram"))])
    assert code == ExitCode.CONFIG_ERROR == 64
    err = capsys.readouterr().err
    assert "model.architecture: 'trigram' is not registered by model.plugin 'my_pkg.bigram'" in err
    assert "(it registers: bigram)" in err
    assert not (tmp_path / "out").exists()  # refused before any work
    # the operator turns the pod's exit 64 and termination message into the run's reason
    pod = {
        "metadata": {"name": "bigram-master-0", "labels": {"kubearch.dev/replica-index": "0"}},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": CONTAINER,
                    "state": {"terminated": {"exitCode": code, "message": term.read_text()}},
                }
            ],
        },
    }
    failure = classify_failure(pod_view(pod))
    assert not failure.retryable and failure.reason == "ConfigError"
    assert "is not registered by model.plugin 'my_pkg.bigram'" in failure.message


def test_a_plugin_that_cannot_be_imported_is_a_config_error_naming_the_field(
    tmp_path: Path, in_plugin_dir: None, capsys: pytest.CaptureFixture
) -> None:
    code = run_train(["--config", str(_config(tmp_path, "bigram", plugin="my_pkg.no_such_module"))])
    assert code == ExitCode.CONFIG_ERROR
    assert "model.plugin: cannot import 'my_pkg.no_such_module'" in capsys.readouterr().err


def test_plugin_flags_and_the_configs_plugin_are_both_imported(
    tmp_path: Path, in_plugin_dir: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubearch_trainer.trainer as trainer

    (tmp_path / "other_plugin_mod.py").write_text(
        "from kubearch_trainer.models import KubearchModel, register\n"
        "@register('other_plugin_arch', task='lm')\n"
        "class P(KubearchModel):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[str] = []
    monkeypatch.setattr(trainer, "train", lambda cfg: seen.append(cfg.model.architecture) or {"exit_code": 0})
    try:
        assert run_train(["--plugin", "other_plugin_mod", "--config", str(_config(tmp_path, "bigram"))]) == 0
        assert seen == ["bigram"]
        assert {"bigram", "other_plugin_arch"} <= set(registry.available_architectures())
    finally:
        registry._REGISTRY.pop("other_plugin_arch", None)
        PLUGIN_ARCHITECTURES.discard("other_plugin_arch")
        sys.modules.pop("other_plugin_mod", None)


# --- the operator ------------------------------------------------------------------------------
def test_auto_resources_plan_a_plugin_architecture_by_the_dataset_alone() -> None:
    """The operator cannot count a plugin model's parameters (its code is only in the image)."""
    from kubearch_operator.api import parse_spec
    from kubearch_operator.builders import plan_run

    model = {"architecture": "bigram", "plugin": "my_pkg.bigram"}
    small = plan_run(parse_spec({"model": model, "resources": {"auto": True}}))
    assert small.shape.gpus == 1 and "plugin my_pkg.bigram" in small.shape.reason
    big = plan_run(parse_spec({"model": model, "resources": {"auto": True, "datasetSamples": 50_000_000}}))
    assert big.shape.gpus == 8  # the dataset's row still applies
