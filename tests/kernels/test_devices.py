"""Devices without TensorFlow: GPU detection from fakes, default job slots, worker pinning plans,
and the ``replicas`` param of keras_train refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernels import InvalidParams, KernelRuntime, RuntimeConfig, UnsatisfiableRequirements, make_spec, validate_inputs
from kernels.models import config_to_array
from kernels.probe import count_nvidia_smi_gpus, default_slots, detect_gpus, driver_gpu_count, visible_gpus
from kernels.runtime import free_gpus, worker_pins
from tests.kernels.helpers import dense_model, sequential_config

GiB = 1 << 30

SMI_LISTING = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-2b7e3e0f-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-9c1d8a2e-aaaa-bbbb-cccc-111111111111)
"""


@pytest.mark.parametrize(("value", "driver", "want"), [
    (None, 0, ()),  # no driver, no GPU
    (None, 2, ("0", "1")),  # unset: every GPU the driver has
    ("1,0", 2, ("1", "0")),  # CUDA's order is the variable's order
    ("2,3", 4, ("2", "3")),  # tokens, not renumbered indices: the pin must name the same GPU
    ("-1", 2, ()),
    ("", 2, ()),
    ("0,-1,1", 2, ("0",)),  # read up to the first invalid entry, as CUDA does
    ("0,5,1", 2, ("0",)),  # out of range ends the list too
    ("0,0", 2, ("0",)),  # a repeat is invalid
    (" 1 , 0", 2, ("1", "0")),
    ("01", 2, ("1",)),
    ("GPU-2b7e,MIG-1111", 1, ("GPU-2b7e", "MIG-1111")),  # UUIDs kept as they are
    ("GPU-2b7e", 0, ()),  # no driver: no GPU whatever the variable says
    ("nvidia0", 2, ()),
])
def test_visible_gpus_follows_cuda_rules(value: str | None, driver: int, want: tuple[str, ...]) -> None:
    assert visible_gpus(value, driver) == want


def test_nvidia_smi_listing_counts_gpus_not_mig_instances() -> None:
    assert count_nvidia_smi_gpus(SMI_LISTING) == 2
    assert count_nvidia_smi_gpus("") == 0
    assert count_nvidia_smi_gpus("No devices were found\n") == 0


def test_driver_count_prefers_proc_and_falls_back_to_nvidia_smi(tmp_path: Path) -> None:
    proc = tmp_path / "gpus"
    asked: list[str] = []

    def smi() -> str:
        asked.append("smi")
        return SMI_LISTING

    assert driver_gpu_count(str(proc), smi) == 2 and asked == ["smi"]  # no /proc entry (WSL2): ask the tool
    assert driver_gpu_count(str(proc), lambda: None) == 0  # neither: no GPU
    proc.mkdir()
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (proc / bus).mkdir()
    asked.clear()
    assert driver_gpu_count(str(proc), smi) == 3 and asked == []  # /proc answers without running anything
    (proc / "0000:17:00.0").rmdir()
    (proc / "0000:65:00.0").rmdir()
    (proc / "0000:ca:00.0").rmdir()
    assert driver_gpu_count(str(proc), smi) == 0  # driver loaded, no GPU left


def test_detect_gpus_combines_environment_and_driver() -> None:
    assert detect_gpus({}, driver_count=2) == ("0", "1")
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "1"}, driver_count=2) == ("1",)
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, driver_count=8) == ()
    assert detect_gpus({}, driver_count=0) == ()


@pytest.mark.parametrize(("kind", "gpus", "cores", "memory", "want"), [
    ("gpu", 4, 32, 256 * GiB, 4),  # one per GPU
    ("gpu", 1, 2, 4 * GiB, 1),
    ("gpu", 0, 8, 16 * GiB, 1),  # TensorFlow sees a GPU the driver count missed: still one slot
    ("cpu", 0, 2, 4 * GiB, 1),  # the 2-core devnet: one job at a time
    ("cpu", 0, 1, 1 * GiB, 1),  # never zero
    ("cpu", 0, 8, 64 * GiB, 2),  # cores // 4
    ("cpu", 0, 16, 64 * GiB, 4),
    ("cpu", 0, 64, 6 * GiB, 3),  # memory caps it: 2 GiB per slot
    ("cpu", 0, 16, 0, 1),  # memory unknown
])
def test_default_slots(kind: str, gpus: int, cores: int, memory: int, want: int) -> None:
    assert default_slots(kind, gpus, cores, memory) == want


def test_default_slots_refuses_an_unknown_device_kind() -> None:
    with pytest.raises(ValueError, match="device_kind"):
        default_slots("tpu", 0, 8, 8 * GiB)


def test_worker_pins_round_robin() -> None:
    assert worker_pins((), 2) == [(), ()]
    assert worker_pins(("0", "1"), 2) == [("0",), ("1",)]
    assert worker_pins(("2", "3"), 3) == [("2",), ("3",), ("2",)]


def test_free_gpus_takes_only_gpus_no_busy_worker_holds() -> None:
    gpus = ("0", "1", "2", "3")
    assert free_gpus(gpus, [], 2) == ("0", "1")
    assert free_gpus(gpus, [("0",), ("2",)], 2) == ("1", "3")
    assert free_gpus(gpus, [("0",), ("2",)], 3) is None
    assert free_gpus(gpus, [("1", "2")], 2) == ("0", "3")  # a multi-GPU worker holds all of its GPUs
    assert free_gpus(gpus, [], 5) is None


def test_runtime_config_checked_and_gpus_resolved_without_spawning() -> None:
    with pytest.raises(ValueError, match="device 'cpu' hides GPUs"):
        KernelRuntime(RuntimeConfig(device="cpu", gpus=(0,)))
    with pytest.raises(ValueError, match="listed twice"):
        KernelRuntime(RuntimeConfig(gpus=(0, "0")))
    for bad in (-1, "0,1", "", 1.0):
        with pytest.raises(ValueError, match="not a GPU index or UUID"):
            KernelRuntime(RuntimeConfig(gpus=(bad,)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logical_cpus"):
        KernelRuntime(RuntimeConfig(logical_cpus=0))
    assert KernelRuntime(RuntimeConfig(workers=2, gpus=(1, "GPU-ab", 3))).gpus == ("1", "GPU-ab")
    assert KernelRuntime(RuntimeConfig(workers=3, gpus=(1,))).gpus == ("1",)
    assert KernelRuntime(RuntimeConfig(workers=2, gpus=())).gpus == ()
    assert KernelRuntime(RuntimeConfig(device="cpu")).gpus == ()


async def test_multi_gpu_job_beyond_the_runtimes_gpus_is_refused_before_spawning() -> None:
    rt = KernelRuntime(RuntimeConfig(workers=2, gpus=(0, 1)))
    data, params = train_data()
    spec = make_spec("keras_train", 1, {**params, "replicas": 4}, data)
    with pytest.raises(UnsatisfiableRequirements, match="needs 4 GPUs at once; this runtime has 2"):
        await rt.run(spec, data)
    assert rt.worker_gpus() == {}  # refused before a worker was spawned
    rt.close()


def train_data(extra: list[dict] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    model, _ = dense_model(3, [(2, "linear")])
    if extra is not None:
        model["model"] = config_to_array(json.dumps(sequential_config(3, [(2, "linear")], extra)))
    data = {**model, "x": np.zeros((8, 3), np.float32), "y": np.zeros((8, 2), np.float32)}
    return data, {"steps": 2, "batch_size": 4}


def test_keras_train_replicas_param_checked_before_any_work() -> None:
    data, params = train_data()
    assert make_spec("keras_train", 1, {**params, "replicas": 2}, data)  # 4 rows split 2 + 2
    assert make_spec("keras_train", 1, {**params, "replicas": 4}, data)
    with pytest.raises(InvalidParams, match="'replicas': 0 is below"):
        make_spec("keras_train", 1, {**params, "replicas": 0}, data)
    with pytest.raises(InvalidParams, match="'replicas': 65 is above"):
        make_spec("keras_train", 1, {**params, "replicas": 65}, data)
    with pytest.raises(InvalidParams, match="'batch_size': 4 does not split evenly over 3 replicas"):
        make_spec("keras_train", 1, {**params, "replicas": 3}, data)


@pytest.mark.parametrize("layer", ["Dropout", "BatchNormalization"])
def test_keras_train_replicas_refuse_split_sensitive_layers(layer: str) -> None:
    config = {"name": layer.lower(), "trainable": True}
    if layer == "Dropout":
        config["rate"] = 0.5
    extra = [{"module": "keras.layers", "class_name": layer, "config": config, "registered_name": None}]
    data, params = train_data(extra)
    one = make_spec("keras_train", 1, params, data)
    validate_inputs(one, data)  # one device: the layer is fine
    two = make_spec("keras_train", 1, {**params, "replicas": 2}, data)
    with pytest.raises(InvalidParams, match=f"cannot train a model with {layer} \\(layer 2\\)"):
        validate_inputs(two, data)
