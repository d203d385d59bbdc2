"""Hardware probe and short benchmark a peer runs before it posts a market offer.

The probe describes the machine (CPU, RAM, CUDA GPUs with NVML telemetry where present) and measures what
it can actually deliver (matmul TFLOP/s, memory bandwidth), because an offer is priced on measured
capacity, not on the model name a seller claims. Everything returned is plain JSON/msgpack data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch

logger = logging.getLogger(__name__)

#: Total benchmark time, split evenly across measurements; long enough for a stable median, short
#: enough that `hivemarket peer probe` stays interactive (~2-4 s end to end on a 2-core CPU).
BENCHMARK_SECONDS: float = 1.5
#: Untimed runs before timing, so one-off costs (page faults, cuBLAS handles, kernel selection) are excluded.
WARMUP_ITERS: int = 2
#: Square matmul sizes: big enough to be compute-bound, small enough that one run fits the budget.
CPU_MATMUL_N: int = 1024
GPU_MATMUL_N: int = 8192
#: Copy sizes for bandwidth: well beyond last-level cache so the copy streams through main memory.
CPU_COPY_BYTES: int = 128 * 2**20
GPU_COPY_BYTES: int = 2**30
#: bf16 tensor cores arrive with Ampere (8.0); older GPUs emulate bf16, which would understate capacity.
BF16_MIN_CAPABILITY: tuple[int, int] = (8, 0)
GIB: int = 2**30

NVML_FIELDS: tuple[str, ...] = (
    "power_w",
    "temperature_c",
    "utilization_pct",
    "thermal_headroom_c",
    "throttled",
    "clock_ratio",
)
#: NVML's clock throttle reasons that mean "slowed for heat or power" (not idle, not an application cap):
#: SW power cap, HW slowdown, SW thermal, HW thermal, HW power brake. A GPU held down by one of them
#: delivers less than its probe measured, through no fault of its peer (coordinator.capacity).
THROTTLE_REASONS: int = 0x4 | 0x8 | 0x20 | 0x40 | 0x80


def read_nvml(uuids: Sequence[str]) -> list[dict[str, float | None]]:
    """Read power, temperature and utilisation for CUDA devices identified by UUID, one reading each.

    Devices are matched by UUID rather than index because NVML enumerates all GPUs while CUDA honours
    CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER. Any NVML failure (no pynvml, no driver library, unsupported
    query) degrades quietly to None values: telemetry is informative, never a reason to refuse an offer.
    """
    readings: list[dict[str, float | None]] = [dict.fromkeys(NVML_FIELDS) for _ in uuids]
    if not readings:  # nothing to read: don't load the driver library on CPU-only hosts
        return readings
    try:
        import pynvml
    except ImportError:
        return readings
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        logger.debug("NVML unavailable: %s", exc)
        return readings
    try:
        wanted = {_uuid_key(uuid): i for i, uuid in enumerate(uuids)}
        for nvml_index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            position = wanted.get(_uuid_key(pynvml.nvmlDeviceGetUUID(handle)))
            if position is not None:
                readings[position] = _read_nvml_device(pynvml, handle)
    except pynvml.NVMLError as exc:
        logger.debug("NVML query failed: %s", exc)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return readings


def combined(readings: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Several GPUs' readings as one: power summed, temperature the hottest, utilisation the mean (each
    over the GPUs that report it; None when none does)."""

    def values(key: str) -> list[float]:
        return [r[key] for r in readings if r.get(key) is not None]  # type: ignore[misc]

    power, temperature, utilization = values("power_w"), values("temperature_c"), values("utilization_pct")
    throttled, clocks = values("throttled"), values("clock_ratio")
    return {
        "power_w": sum(power) if power else None,
        "temperature_c": max(temperature) if temperature else None,
        "utilization_pct": sum(utilization) / len(utilization) if utilization else None,
        # the swarm waits for its slowest GPU: one throttled GPU throttles the peer
        "throttled": any(throttled) if throttled else None,
        "clock_ratio": min(clocks) if clocks and any(throttled) else None,
    }


def _uuid_key(uuid: str | bytes) -> str:
    """Normalise a UUID to its hex digits: NVML says "GPU-ab12-...", torch "ab12-...", old pynvml bytes."""
    text = uuid.decode() if isinstance(uuid, bytes) else uuid
    return "".join(ch for ch in text.lower().removeprefix("gpu-") if ch in "0123456789abcdef")


def _read_nvml_device(pynvml: Any, handle: Any) -> dict[str, float | None]:
    """Query each field separately, since consumer and virtualised GPUs often support only some of them."""

    def query(read: Callable[[], float]) -> float | None:
        try:
            return float(read())
        except (pynvml.NVMLError, AttributeError):  # AttributeError: a pynvml too old for the query
            return None

    temperature = query(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    slowdown = query(
        lambda: pynvml.nvmlDeviceGetTemperatureThreshold(handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
    )
    reasons = query(lambda: pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
    clock = query(lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS))
    top = query(lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS))
    return {
        "power_w": query(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),  # NVML reports mW
        "temperature_c": temperature,
        "utilization_pct": query(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        "thermal_headroom_c": None if temperature is None or slowdown is None else slowdown - temperature,
        "throttled": None if reasons is None else bool(int(reasons) & THROTTLE_REASONS),
        "clock_ratio": min(1.0, clock / top) if clock and top else None,
    }


def _cuda_device_count() -> int:
    """Count CUDA devices; a CUDA build of torch on a driverless host warns, which we log instead of print."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for warning in caught:
        logger.debug("CUDA probe: %s", warning.message)
    return count


def _cpu_model() -> str:
    """platform.processor() is empty on most Linux systems, so prefer /proc/cpuinfo's model name."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def _gpus(count: int) -> list[dict[str, Any]]:
    """Describe every visible CUDA device, merging in NVML telemetry."""
    props = [torch.cuda.get_device_properties(index) for index in range(count)]
    uuids = [str(getattr(prop, "uuid", "")) for prop in props]
    telemetry = read_nvml(uuids)
    return [
        {
            "index": index,
            "uuid": uuids[index],  # how NVML finds this device again (peer/metrics.py, heartbeats)
            "name": prop.name,
            "vram_gb": round(prop.total_memory / GIB, 2),
            "compute_capability": f"{prop.major}.{prop.minor}",
            **telemetry[index],
        }
        for index, prop in enumerate(props)
    ]


def _seconds_per_run(op: Callable[[], object], budget_s: float, sync: Callable[[], None]) -> float:
    """Warm up, then repeat `op` until `budget_s` is spent; the median resists noisy neighbours."""
    for _ in range(WARMUP_ITERS):
        op()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while not times or time.perf_counter() < deadline:
        start = time.perf_counter()
        op()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int, budget_s: float, sync: Callable[[], None]
) -> float:
    """Square matmul throughput, counting 2*n^3 flops; a local generator leaves torch's global RNG alone."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _seconds_per_run(lambda: torch.matmul(a, b, out=out), budget_s, sync)
    return 2 * n**3 / seconds / 1e12


def _copy_gbps(device: torch.device, nbytes: int, budget_s: float, sync: Callable[[], None]) -> float:
    """Copy bandwidth counting read+write bytes; the source is written first so no page is a zero page."""
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _seconds_per_run(lambda: dst.copy_(src), budget_s, sync)
    return 2 * src.nbytes / seconds / 1e9


def benchmark(benchmark_seconds: float = BENCHMARK_SECONDS, use_cuda: bool | None = None) -> dict[str, Any]:
    """Measure fp32 (and on GPU bf16) matmul TFLOP/s and memory bandwidth on cuda:0, else the CPU."""
    if use_cuda is None:
        use_cuda = _cuda_device_count() > 0
    device = torch.device("cuda:0" if use_cuda else "cpu")
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if use_cuda else (lambda: None)
    measure_bf16 = use_cuda and torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY
    budget_s = benchmark_seconds / (3 if measure_bf16 else 2)
    n = GPU_MATMUL_N if use_cuda else CPU_MATMUL_N
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            fp32 = _matmul_tflops(device, torch.float32, n, budget_s, sync)
            bf16 = _matmul_tflops(device, torch.bfloat16, n, budget_s, sync) if measure_bf16 else None
            gbps = _copy_gbps(device, GPU_COPY_BYTES if use_cuda else CPU_COPY_BYTES, budget_s, sync)
    finally:
        if use_cuda:
            torch.cuda.empty_cache()  # hand the benchmark's memory back before training allocates
    return {
        "device": str(device),
        "fp32_tflops": round(fp32, 4),
        "bf16_tflops": None if bf16 is None else round(bf16, 4),
        "memory_bandwidth_gbps": round(gbps, 2),
        "seconds": round(time.perf_counter() - started, 3),
    }


def probe(benchmark_seconds: float = BENCHMARK_SECONDS) -> dict[str, Any]:
    """Describe this machine and benchmark it; the result is what `hivemarket peer probe --json` prints."""
    gpu_count = _cuda_device_count()
    # benchmark first: the GPUs' NVML readings just after it are the power a loaded GPU draws (an offer's
    # power_w), not what it draws idle
    measured = benchmark(benchmark_seconds, use_cuda=gpu_count > 0)
    result: dict[str, Any] = {
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count() or 1,
            "physical_cores": psutil.cpu_count(logical=False),
        },
        "ram_gb": round(psutil.virtual_memory().total / GIB, 2),
        "gpus": _gpus(gpu_count),
        "torch_version": str(torch.__version__),
        "cuda_available": gpu_count > 0,
        "benchmark": measured,
    }
    logger.debug("hardware probe: %s", result)
    return result


def summary(probe_result: dict[str, Any]) -> dict[str, Any]:
    """Flatten a probe into the few fields that DHT capability records and market offers carry."""
    gpus = probe_result["gpus"]
    bench = probe_result["benchmark"]
    best = bench.get("bf16_tflops") if gpus else None
    power = [g["power_w"] for g in gpus if g.get("power_w") is not None]
    headroom = [g["thermal_headroom_c"] for g in gpus if g.get("thermal_headroom_c") is not None]
    return {
        "gpu": str(gpus[0]["name"]) if gpus else "cpu",
        "gpu_count": len(gpus),
        "vram_gb": float(gpus[0]["vram_gb"]) if gpus else 0.0,
        "tflops": float(best if best is not None else bench["fp32_tflops"]),
        "ram_gb": float(probe_result["ram_gb"]),
        "cpu_cores": int(probe_result["cpu"]["logical_cores"]),
        # NVML's, where a GPU has it (null on CPUs, without pynvml, or on GPUs that do not say): what the
        # offer draws and how close the hottest GPU runs to slowing down
        "power_w": sum(power) if power else None,
        "thermal_headroom_c": min(headroom) if headroom else None,
    }
