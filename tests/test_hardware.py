"""Tests for the hardware probe: real probe on this machine, summary shapes, NVML degradation paths."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from typing import Any

import pytest
import torch

from peer import hardware

PROBE_DEADLINE_S = 30.0
SUMMARY_TYPES: dict[str, type] = {
    "gpu": str,
    "gpu_count": int,
    "vram_gb": float,
    "tflops": float,
    "ram_gb": float,
    "cpu_cores": int,
}


@pytest.fixture(scope="module")
def probed() -> tuple[dict[str, Any], float]:
    """Run the real probe once with default budgets, timing it, and share it across tests."""
    start = time.perf_counter()
    result = hardware.probe()
    return result, time.perf_counter() - start


@pytest.mark.timeout(60)
def test_probe_describes_this_machine(probed: tuple[dict[str, Any], float]) -> None:
    result, elapsed = probed
    assert elapsed < PROBE_DEADLINE_S
    assert result["cpu"]["logical_cores"] == os.cpu_count()
    assert result["cpu"]["logical_cores"] >= 1
    physical = result["cpu"]["physical_cores"]
    assert physical is None or 1 <= physical <= result["cpu"]["logical_cores"]
    assert isinstance(result["cpu"]["model"], str) and result["cpu"]["model"]
    assert result["ram_gb"] > 0
    assert result["torch_version"] == torch.__version__
    assert result["cuda_available"] is torch.cuda.is_available()
    assert len(result["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if not torch.cuda.is_available():
        assert result["gpus"] == []


@pytest.mark.timeout(60)
def test_probe_benchmark_figures(probed: tuple[dict[str, Any], float]) -> None:
    bench = probed[0]["benchmark"]
    assert bench["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert bench["fp32_tflops"] > 0
    assert bench["memory_bandwidth_gbps"] > 0
    assert 0 < bench["seconds"] < PROBE_DEADLINE_S
    if not torch.cuda.is_available():
        assert bench["bf16_tflops"] is None


@pytest.mark.timeout(60)
def test_probe_is_json_serialisable(probed: tuple[dict[str, Any], float]) -> None:
    result = probed[0]
    assert json.loads(json.dumps(result)) == result


@pytest.mark.timeout(60)
def test_benchmark_leaves_torch_global_state_alone() -> None:
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    bench = hardware.benchmark(benchmark_seconds=0.1, use_cuda=False)
    assert bench["fp32_tflops"] > 0
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert not torch.is_inference_mode_enabled()


@pytest.mark.timeout(60)
def test_summary_of_real_probe(probed: tuple[dict[str, Any], float]) -> None:
    result = probed[0]
    flat = hardware.summary(result)
    assert set(flat) == set(SUMMARY_TYPES) | {"power_w", "thermal_headroom_c"}
    for key, expected in SUMMARY_TYPES.items():
        assert type(flat[key]) is expected, key
    if not torch.cuda.is_available():  # NVML's readings: none without a GPU
        assert (flat["power_w"], flat["thermal_headroom_c"]) == (None, None)
    assert flat["cpu_cores"] == os.cpu_count()
    assert flat["ram_gb"] == result["ram_gb"]
    if not torch.cuda.is_available():
        assert (flat["gpu"], flat["gpu_count"], flat["vram_gb"]) == ("cpu", 0, 0.0)
        assert flat["tflops"] == result["benchmark"]["fp32_tflops"]


def _gpu(index: int, name: str, vram_gb: float) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "vram_gb": vram_gb,
        "compute_capability": "8.0",
        "power_w": None,
        "temperature_c": None,
        "utilization_pct": None,
    }


def test_summary_of_two_gpu_probe() -> None:
    result = {
        "cpu": {"model": "Test CPU", "logical_cores": 32, "physical_cores": 16},
        "ram_gb": 251.5,
        "gpus": [_gpu(0, "NVIDIA H100 80GB HBM3", 79.1), _gpu(1, "NVIDIA A100-SXM4-40GB", 39.4)],
        "torch_version": "2.4.0",
        "cuda_available": True,
        "benchmark": {
            "device": "cuda:0",
            "fp32_tflops": 51.2,
            "bf16_tflops": 612.5,
            "memory_bandwidth_gbps": 2900.0,
            "seconds": 1.5,
        },
    }
    assert hardware.summary(result) == {
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_count": 2,
        "vram_gb": 79.1,
        "tflops": 612.5,
        "ram_gb": 251.5,
        "cpu_cores": 32,
        "power_w": None,
        "thermal_headroom_c": None,
    }
    result["gpus"][0] |= {"power_w": 300.0, "thermal_headroom_c": 20.0}
    result["gpus"][1] |= {"power_w": 250.0, "thermal_headroom_c": 12.0}  # the offer: summed, the least
    assert hardware.summary(result)["power_w"] == 550.0
    assert hardware.summary(result)["thermal_headroom_c"] == 12.0
    result["benchmark"]["bf16_tflops"] = None  # pre-Ampere GPU: bf16 not measured, fall back to fp32
    assert hardware.summary(result)["tflops"] == 51.2


def test_read_nvml_quiet_when_init_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")

    def failing_init() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", failing_init)
    readings = hardware.read_nvml(["GPU-0000", "GPU-0001"])
    assert readings == [dict.fromkeys(hardware.NVML_FIELDS)] * 2


def test_read_nvml_skips_nvml_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hardware.read_nvml([]) == []
    assert fake.calls == []


def test_read_nvml_quiet_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert hardware.read_nvml(["abcd"]) == [dict.fromkeys(hardware.NVML_FIELDS)]


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(fail_after_init: bool = False) -> types.SimpleNamespace:
    """An NVML with two GPUs in the opposite order to CUDA's; GPU "bb" cannot report temperature."""
    calls: list[str] = []

    def temperature(handle: str, sensor: int) -> int:
        if handle == "bb":
            raise _FakeNVMLError("not supported")
        return 61

    def count() -> int:
        if fail_after_init:
            raise _FakeNVMLError("lost the GPU")
        return 2

    return types.SimpleNamespace(
        calls=calls,
        NVMLError=_FakeNVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=count,
        nvmlDeviceGetHandleByIndex=lambda i: ["bb", "aa"][i],
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}{h}-0000",
        nvmlDeviceGetPowerUsage=lambda h: 250_500,
        nvmlDeviceGetTemperature=temperature,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
    )


def test_read_nvml_matches_by_uuid_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    readings = hardware.read_nvml(["aaaa-0000", "bbbb-0000", "cccc-0000"])
    # the fake has no throttle, clock or threshold queries (an old pynvml): those read as None
    unknown = {"thermal_headroom_c": None, "throttled": None, "clock_ratio": None}
    assert readings == [
        {"power_w": 250.5, "temperature_c": 61.0, "utilization_pct": 87.0, **unknown},
        {"power_w": 250.5, "temperature_c": None, "utilization_pct": 87.0, **unknown},
        dict.fromkeys(hardware.NVML_FIELDS),
    ]
    assert fake.calls == ["init", "shutdown"]


def test_read_nvml_shuts_down_after_query_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(fail_after_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hardware.read_nvml(["aaaa-0000"]) == [dict.fromkeys(hardware.NVML_FIELDS)]
    assert fake.calls == ["init", "shutdown"]


def test_read_nvml_reports_throttling_headroom_and_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU slowed for heat reports it (heartbeats carry it, so the market re-rates it instead of holding
    its shortfall against it), its headroom to the slowdown temperature and its clock over the maximum."""
    fake = _fake_pynvml()
    fake.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, fake.NVML_CLOCK_GRAPHICS = 1, 0
    fake.nvmlDeviceGetTemperatureThreshold = lambda h, kind: 83
    fake.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x40 if h == "aa" else 0x1  # HW thermal; idle
    fake.nvmlDeviceGetClockInfo = lambda h, kind: 990 if h == "aa" else 1980
    fake.nvmlDeviceGetMaxClockInfo = lambda h, kind: 1980
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    hot, idle = hardware.read_nvml(["aaaa-0000", "bbbb-0000"])
    assert (hot["throttled"], hot["clock_ratio"], hot["thermal_headroom_c"]) == (True, 0.5, 22.0)
    assert (idle["throttled"], idle["clock_ratio"], idle["thermal_headroom_c"]) == (False, 1.0, None)
    both = hardware.combined([hot, idle])
    assert (both["throttled"], both["clock_ratio"]) == (True, 0.5)
    assert hardware.combined([idle])["clock_ratio"] is None  # not throttled: nothing to re-weight
