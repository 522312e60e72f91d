"""HardwareSpec: what the cluster is, as data. Presets are bundled YAML under specs/presets/.

Conventions (the cost models rely on them):
- bandwidths are *unidirectional* bytes per second: `intra_node.bandwidth_bytes_per_s` is what
  one device can send to the others in its node at once (NVLink: half the marketing
  "bidirectional" figure); `inter_node.bandwidth_bytes_per_s` is what one *node* can send
  into the network at once (sum of its NICs).
- `device.memory_bytes` is what the allocator can see on one device (torch's total_memory).
- Every number in a preset carries its source in `sources`.
- Every number is finite and within a sane range (`RANGES`): generous bounds, orders of magnitude
  past today's largest machines, that refuse inf/nan/1e308 and unit mistakes before the cost
  models or the search see them.

This host: the bundled `cpu` preset describes the host it was calibrated on (its
`sources.host_key`). `HardwareSpec.preset("local")` (`--hw local:4`) is this host's own
calibration instead: the preset-form YAML that `autoplan calibrate --local` (runtime/calibrate.py,
about half a minute) writes to `local_spec_path()`, <cache home>/hosts/<host_key()>.yaml, the
key naming the CPU model, core count, torch version and GPU (the things a calibration depends
on). This module only reads that file: measuring is the runtime's (`python -m planner.demo`
runs the calibration when the file is missing). `foreign_host_note` says when a plan for the
`cpu` preset describes another host.
"""

from __future__ import annotations

import glob
import os
import re
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Literal, TypedDict

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from specs._base import Frozen, SaneRange, SpecError, validate_model
from specs.io import load_data

DType = Literal["fp64", "fp32", "tf32", "bf16", "fp16", "fp8"]
OpKind = Literal["matmul", "attention", "conv", "elementwise", "memory", "other"]
CollectiveName = Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "p2p"]

MAX_DEVICES = 2**20
_BANDWIDTH = SaneRange(1e3, 1e15, "bytes/s", "HBM3e is ~8e12, NVLink 5 ~9e11 per direction; 1e15 is 100x that")
_SECONDS = SaneRange(0.0, 1.0, "s", "launches and link latencies are microseconds, a WAN round trip ~0.3 s")
_MEMORY = SaneRange(1, 2**50, "bytes", "1 PiB; the largest accelerators have 288 GB, the largest hosts ~32 TiB")
RANGES: dict[str, SaneRange] = {
    "memory_bytes": _MEMORY,
    # B200 dense fp8 is ~4.5e15 FLOP/s; 1e18 leaves 200x. A 1990s CPU did ~1e8.
    "peak_flops_per_s": SaneRange(1e6, 1e18, "FLOP/s", "a B200 does ~4.5e15 dense fp8"),
    "memory_bandwidth_bytes_per_s": _BANDWIDTH,
    "bandwidth_bytes_per_s": _BANDWIDTH,
    "pcie_bandwidth_bytes_per_s": _BANDWIDTH,
    "latency_s": _SECONDS,
    "kernel_launch_s": _SECONDS,
    "cpu_adam_params_per_s": SaneRange(1.0, 1e15, "params/s", "measured CPU Adam is ~1e8-1e9"),
    # 100k-GPU clusters exist; the search over the divisors of 2**20 devices takes ~10 s.
    "num_nodes": SaneRange(1, MAX_DEVICES, "nodes", "the search plans up to 2**20 devices"),
    "devices_per_node": SaneRange(1, 4096, "devices", "NVL72 racks have 72; CPU hosts a few hundred cores"),
    "shared_cores": SaneRange(1, 2**16, "cores", "the largest hosts have a few thousand"),
    "size": SaneRange(1e-30, 1e30, "FLOPs or bytes", "one kernel's problem size"),
    "shared_sync_penalty_s": _SECONDS,
    "pipeline_action_overhead_s": _SECONDS,
    "forward_s": _SECONDS,
    "backward_s": _SECONDS,
    "optimizer_s": _SECONDS,
}


class _Finite(Frozen):
    """Base of the hardware specs: inf and nan are refused everywhere (pydantic's allow_inf_nan)."""

    model_config = ConfigDict(allow_inf_nan=False)


def _sane(value: float | None, info: ValidationInfo) -> float | None:
    """Field validator: `value` within RANGES[field] (None passes: an unset optional field)."""
    assert info.field_name is not None  # pydantic names the field of a field validator
    return value if value is None else RANGES[info.field_name].check(value)


class DeviceSpec(_Finite):
    name: str = Field(description="Accelerator model, e.g. 'A100-SXM4-80GB'.")
    memory_bytes: int = Field(gt=0, description="Device memory visible to the allocator, bytes.")
    peak_flops_per_s: dict[DType, float] = Field(
        description="Dense peak FLOP/s per dtype (no structured sparsity)."
    )
    memory_bandwidth_bytes_per_s: float = Field(gt=0, description="Peak device-memory bandwidth, bytes/s.")
    kernel_launch_s: float = Field(
        default=5e-6, ge=0, description="Floor on the time of one kernel/op (launch + tail), seconds."
    )

    _ranges = field_validator("memory_bytes", "memory_bandwidth_bytes_per_s", "kernel_launch_s")(_sane)

    @model_validator(mode="after")
    def _check_flops(self) -> DeviceSpec:
        if not self.peak_flops_per_s:
            raise ValueError("peak_flops_per_s: give at least one dtype, e.g. {bf16: 3.12e14}")
        for k, v in self.peak_flops_per_s.items():
            if v <= 0:
                raise ValueError(f"peak_flops_per_s.{k}: must be > 0 (got {v})")
            RANGES["peak_flops_per_s"].check(v, f"peak_flops_per_s.{k}")
        return self


class LinkSpec(_Finite):
    bandwidth_bytes_per_s: float = Field(gt=0, description="Unidirectional bandwidth, bytes/s.")
    latency_s: float = Field(ge=0, description="Per-message latency (alpha), seconds.")

    _ranges = field_validator("bandwidth_bytes_per_s", "latency_s")(_sane)


class HostSpec(_Finite):
    memory_bytes: int = Field(gt=0, description="Host (CPU) memory per node, bytes; bounds offload.")
    pcie_bandwidth_bytes_per_s: float = Field(
        gt=0, description="Host<->device bandwidth per device, unidirectional, bytes/s (offload)."
    )
    cpu_adam_params_per_s: float = Field(
        default=1.0e9, gt=0, description="Optimizer-step throughput on the host per device (offload), params/s."
    )

    _ranges = field_validator("memory_bytes", "pcie_bandwidth_bytes_per_s", "cpu_adam_params_per_s")(_sane)


class EfficiencyPoint(_Finite):
    size: float = Field(gt=0, description="Problem size: FLOPs for compute kinds, bytes for memory kinds.")
    efficiency: float = Field(gt=0, le=1, description="Achieved fraction of peak at that size.")

    _ranges = field_validator("size")(_sane)


class DTensorOverhead(_Finite):
    """Host time of running tensor-parallel ops on DTensor parameters instead of plain tensors
    (sharding propagation and dispatch in Python, redistribution bookkeeping, the extra copies
    it makes), measured by `autoplan calibrate` on a CPU host: a block of Linears under
    ColwiseParallel/RowwiseParallel on a one-rank mesh against the same block plain
    (runtime/calibrate_dtensor.py). Per tensor-parallel op (a Linear or Embedding whose
    parameters are DTensors)."""

    forward_s: float = Field(ge=0, description="Per op and micro-batch in forward, seconds.")
    backward_s: float = Field(ge=0, description="Per op and micro-batch in backward, seconds.")
    optimizer_s: float = Field(default=0.0, ge=0, description="Per op's parameters per optimizer step, seconds.")

    _ranges = field_validator("forward_s", "backward_s", "optimizer_s")(_sane)


_SHARED_FIELDS = {"core_efficiency": "shared_core_efficiency", "memory_efficiency": "shared_memory_efficiency",
                  "sync_penalty_s": "shared_sync_penalty_s"}


def apply_shared_host(data: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    """Preset data with a `shared_host` section (the cpu preset) -> HardwareSpec data for its
    devices_per_node processes on one host: they share its cores and memory, so per-process peak
    FLOP/s, memory bandwidth and host optimizer rate are x min(1, cores / N), memory is the usable
    host memory / N, and the measured sharing figures become the shared_* fields."""
    data = dict(data)
    n = data["devices_per_node"]
    cores = int(shared["cores"])
    scale = min(1.0, cores / n)
    dev = dict(data["device"])
    dev["peak_flops_per_s"] = {k: v * scale for k, v in dev["peak_flops_per_s"].items()}
    dev["memory_bandwidth_bytes_per_s"] = dev["memory_bandwidth_bytes_per_s"] * scale
    dev["memory_bytes"] = int(shared["memory_bytes"] * shared.get("usable_fraction", 1.0) / n)
    data["device"] = dev
    host = dict(data["host"])
    host["cpu_adam_params_per_s"] = host["cpu_adam_params_per_s"] * scale
    data["host"] = host
    data["shared_cores"] = cores
    for key, field in _SHARED_FIELDS.items():
        if key in shared:
            data[field] = shared[key]
    return data


# ------------------------------------------------------------------------------- this host
LOCAL_PRESET = "local"


def cache_home() -> Path:
    """autoplan's cache directory: $AUTOPLAN_CACHE_DIR, else $XDG_CACHE_HOME/autoplan, else
    ~/.cache/autoplan (cost_models.kernels keeps its compiled kernels under the same home)."""
    home = os.environ.get("AUTOPLAN_CACHE_DIR")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = str(Path(xdg) / "autoplan")
    return Path(home).expanduser()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def format_host_key(cpu_model: str, cores: int, torch_version: str, gpu_name: str | None = None) -> str:
    """The cache key of a host: 'intel-r-xeon-r-processor-6.167.1-2cores-torch2.14.1' (+ '-' GPU)."""
    key = f"{_slug(cpu_model)}-{cores}cores-torch{_slug(torch_version)}"
    return f"{key}-{_slug(gpu_name)}" if gpu_name else key


class HostFacts(TypedDict):
    """What `detect_host` reads: the arguments of `format_host_key`."""

    cpu_model: str
    cores: int
    torch_version: str
    gpu_name: str | None


def detect_host() -> HostFacts:
    """This host's calibration-relevant facts, read without importing torch: the CPU model
    (/proc/cpuinfo's model name with family.model.stepping, which tells apart the CPUs a VM
    names only 'Intel(R) Xeon(R) Processor'; else platform.processor()), the cores this
    process may use, torch's installed version, and the first NVIDIA GPU's model (the driver's
    /proc/driver/nvidia/gpus/*/information; None without one)."""
    import platform

    cpu_model, ids = "", {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "" and cpu_model:
                    break  # the first processor's block is enough
                if k == "model name":
                    cpu_model = v
                elif k in ("cpu family", "model", "stepping"):
                    ids[k] = v
    except OSError:
        pass
    if cpu_model and len(ids) == 3:
        cpu_model += f" {ids['cpu family']}.{ids['model']}.{ids['stepping']}"
    cpu_model = cpu_model or platform.processor() or platform.machine() or "unknown-cpu"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    gpu = None
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(info, encoding="utf-8", errors="replace") as f:
                gpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Model:")), None)
        except OSError:
            continue
        if gpu:
            break
    return HostFacts(cpu_model=cpu_model, cores=cores, torch_version=torch_version, gpu_name=gpu)


def host_key() -> str:
    """This host's cache key (`format_host_key` of `detect_host`)."""
    return format_host_key(**detect_host())


def local_spec_path(key: str | None = None) -> Path:
    """Where this host's calibration (preset form) is cached: <cache home>/hosts/<key>.yaml."""
    return cache_home() / "hosts" / f"{key or host_key()}.yaml"


def foreign_host_note(hw: HardwareSpec, key: str | None = None) -> str | None:
    """One plain sentence when `hw` is a preset calibrated on another host than this one (its
    sources.host_key differs from `key`, this host's by default); None otherwise."""
    theirs = hw.sources.get("host_key")
    if not theirs or hw.name == LOCAL_PRESET:
        return None
    mine = key or host_key()
    if theirs == mine:
        return None
    return (
        f"note: the {hw.name!r} preset was calibrated on another host ({theirs}), so its predictions "
        f"describe that host, not this one ({mine}); for this host's, plan with --hw {LOCAL_PRESET}:N "
        f"(once: `autoplan calibrate --local`, about half a minute)"
    )


class HardwareSpec(_Finite):
    name: str = Field(description="Preset or cluster name.")
    num_nodes: int = Field(gt=0, description="Number of nodes (hosts).")
    devices_per_node: int = Field(gt=0, description="Accelerators (or processes) per node.")
    device: DeviceSpec
    intra_node: LinkSpec = Field(description="Device-to-device link inside a node (NVLink/NVSwitch).")
    inter_node: LinkSpec = Field(description="Network between nodes; bandwidth is per node.")
    host: HostSpec
    efficiency: dict[OpKind, list[EfficiencyPoint]] = Field(
        default_factory=dict,
        description="Calibrated efficiency curves (size -> fraction of peak) from `autoplan calibrate`; "
        "empty means the cost model's documented defaults.",
    )
    collective_efficiency: float = Field(
        default=1.0, gt=0, le=1, description="Achieved fraction of link bandwidth for large collectives."
    )
    collectives: dict[CollectiveName, LinkSpec] = Field(
        default_factory=dict,
        description="Optional per-collective calibration for groups inside one node (`autoplan calibrate`): "
        "latency_s = alpha per ring step, bandwidth_bytes_per_s = achieved bus bandwidth (nccl-tests "
        "convention, collective_efficiency already included). A collective not listed uses the links.",
    )
    comm_overlaps_compute: bool = Field(
        default=True,
        description="Whether communication runs beside compute (GPUs: copy engines / NCCL kernels). False "
        "where collectives run on the same cores as compute (gloo on CPU): all communication is exposed.",
    )
    shared_cores: int | None = Field(
        default=None,
        gt=0,
        description="Set (by shared-host presets) when the devices_per_node processes of a node share this "
        "many CPU cores dynamically; device figures are then each process's fair share (per-core figures x "
        "min(1, shared_cores / devices_per_node)). None: devices are not shared (GPUs).",
    )
    shared_core_efficiency: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="With shared_cores: the fraction of shared_cores x one process's speed that all processes "
        "get in aggregate when every one is busy (`autoplan calibrate` measures it: concurrent matmuls).",
    )
    shared_memory_efficiency: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="With shared_cores: the same for memory-bound work: the aggregate copy bandwidth of all "
        "processes copying at once over shared_cores x one process's (`autoplan calibrate`: concurrent "
        "cold copies). Cores share the memory system, so this is usually below shared_core_efficiency.",
    )
    shared_sync_penalty_s: float = Field(
        default=0.0,
        ge=0,
        description="With shared_cores: the average extra wait of one blocking collective when more "
        "processes than cores alternate compute and communication (a peer may be descheduled); "
        "`autoplan calibrate` measures it (cost_models.sharedhost). 0 where not measured.",
    )
    dtensor_overhead: DTensorOverhead | None = Field(
        default=None,
        description="Host time DTensor adds per tensor-parallel op on a CPU host (`autoplan calibrate`; "
        "None: not measured / not charged, as on GPUs, where dispatch runs ahead of the kernels).",
    )
    pipeline_action_overhead_s: float = Field(
        default=0.0,
        ge=0,
        description="Host time the pipelining engine adds per forward or backward action of a stage on a CPU "
        "host (schedule bookkeeping, receive buffers, sends and receives; `autoplan calibrate`). 0: not "
        "measured / not charged (GPUs, whose host work runs ahead of the kernels).",
    )
    device_is_host_cpu: bool = Field(
        default=False,
        description="The devices are processes on the host CPU (no accelerator): the optimizer step runs "
        "on the CPU at host.cpu_adam_params_per_s (measured) instead of a memory-bandwidth estimate.",
    )
    attention_kernel: Literal["flash", "math"] | None = Field(
        default=None,
        validate_default=True,
        description="Which kernels run fused attention (F.scaled_dot_product_attention) on these devices, "
        "and so what it saves for backward: 'flash' (CUDA flash / memory-efficient / cuDNN kernels: q, k, "
        "v, the output and an fp32 log-sum-exp) or 'math' (the unfused path: the a*s^2 scores, "
        "probabilities and dropout mask too). Default: math where device_is_host_cpu, else flash.",
    )
    sources: dict[str, str] = Field(default_factory=dict, description="Where each constant comes from.")

    @field_validator("attention_kernel", mode="before")
    @classmethod
    def _default_attention_kernel(cls, v: object, info: ValidationInfo) -> object:
        if v is None:
            return "math" if info.data.get("device_is_host_cpu") else "flash"
        return v

    _ranges = field_validator(
        "num_nodes", "devices_per_node", "shared_cores", "shared_sync_penalty_s", "pipeline_action_overhead_s"
    )(_sane)

    @model_validator(mode="after")
    def _check_size(self) -> HardwareSpec:
        if self.num_devices > MAX_DEVICES:
            raise ValueError(
                f"num_nodes: num_nodes({self.num_nodes:,}) * devices_per_node({self.devices_per_node}) = "
                f"{self.num_devices:,} devices, more than the {MAX_DEVICES:,} (2**20) autoplan plans for "
                f"(the largest clusters have ~2e5); check the counts"
            )
        return self

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    def __str__(self) -> str:
        gib = self.device.memory_bytes / 2**30
        return f"{self.name}: {self.num_nodes}x{self.devices_per_node} {self.device.name} ({gib:.0f} GiB)"

    # ------------------------------------------------------------------ loading
    @staticmethod
    def preset_names() -> list[str]:
        root = resources.files("specs") / "presets"
        return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))

    @classmethod
    def preset(cls, name: str, nodes: int | None = None, *, devices: int | None = None) -> HardwareSpec:
        """A bundled preset scaled to `nodes` nodes, or to `devices` devices in all.

        `devices` smaller than one node gives a single partial node (e.g. 4 of 8 GPUs).
        For the `cpu` preset, `devices` is the number of processes on this host: they share its
        cores and memory, so per-process peak FLOP/s and memory are divided among them.
        `local` is this host's cached calibration (see the module docstring), scaled the same way.
        """
        names = cls.preset_names()
        if name == LOCAL_PRESET:
            path = local_spec_path()
            if not path.exists():
                raise SpecError(
                    f"hardware preset {LOCAL_PRESET!r}: this host ({path.stem}) is not calibrated yet; run "
                    f"`autoplan calibrate --local` once (about half a minute; writes {path})"
                )
            data = load_data(path)
        elif name not in names:
            raise SpecError(
                f"unknown hardware preset {name!r}; known presets: {', '.join(names)}, and "
                f"{LOCAL_PRESET!r} (this host, once `autoplan calibrate --local` has measured it)"
            )
        else:
            data = load_data(Path(str(resources.files("specs") / "presets" / f"{name}.yaml")))
        shared = data.pop("shared_host", None)
        per_node = int(data["devices_per_node"])
        if nodes is not None and devices is not None:
            raise SpecError("give either nodes or devices, not both")
        if nodes is not None:
            if nodes <= 0:
                raise SpecError(f"nodes: must be >= 1 (got {nodes})")
            data["num_nodes"] = nodes
        elif devices is not None:
            if devices <= 0:
                raise SpecError(f"devices: must be >= 1 (got {devices})")
            if shared:
                data["num_nodes"], data["devices_per_node"] = 1, devices
            elif devices <= per_node:
                data["num_nodes"], data["devices_per_node"] = 1, devices
            elif devices % per_node:
                raise SpecError(
                    f"{name}: {devices} devices is not a whole number of {per_node}-device nodes; "
                    f"use a multiple of {per_node}"
                )
            else:
                data["num_nodes"] = devices // per_node
        if shared:
            data = apply_shared_host(data, shared)
        return validate_model(cls, data, f"preset {name}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HardwareSpec:
        return validate_model(cls, load_data(path), str(path))

    @classmethod
    def load(cls, ref: str | os.PathLike[str] | HardwareSpec) -> HardwareSpec:
        """A spec from a preset string (`dgx-a100-80gb`, `dgx-a100-80gb:16` = 16 devices,
        `dgx-a100-80gb:2n` = 2 nodes) or from a YAML/JSON file."""
        if isinstance(ref, HardwareSpec):
            return ref
        text = str(ref)
        if os.path.exists(text) or text.endswith((".yaml", ".yml", ".json")):
            return cls.from_file(text)
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?::(\d+)(n?))?", text)
        if not m:
            raise SpecError(
                f"hardware {text!r}: expected a preset like 'dgx-a100-80gb:16' (16 devices) or "
                f"'dgx-a100-80gb:2n' (2 nodes), or a YAML/JSON file path"
            )
        name, count, unit = m.group(1), m.group(2), m.group(3)
        if count is None:
            return cls.preset(name)
        if unit == "n":
            return cls.preset(name, nodes=int(count))
        return cls.preset(name, devices=int(count))

    def to_file(self, path: str | os.PathLike[str]) -> None:
        from specs.io import dump_data

        dump_data(self.model_dump(mode="json"), path)
