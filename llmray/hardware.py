"""The accelerator table: what `compute.accelerator` (and `compute.ipex`) means everywhere.

One row per accelerator, read by the operator (image variant, device resource, pod
environment, Ray start parameters), the trainer (torch device, process-group backend,
DeepSpeed's accelerator, Ray Train's `use_gpu`) and the server (torch device). Pure data:
no torch, no Ray, so the operator image reads it too. A new accelerator is added here only.

    profile("nvidia-gpu", ipex=False)
    -> Profile(accelerator="nvidia-gpu", device_type="cuda", dist_backend="nccl",
               ds_accelerator="cuda", variant="nvidia", device_resource="nvidia.com/gpu", ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Extended resource of one NVIDIA GPU (NVIDIA's device plugin), e.g. limits: {nvidia.com/gpu: 1}.
NVIDIA_GPU_RESOURCE = "nvidia.com/gpu"
# Intel's GPU device plugin advertises each GPU on the i915 kernel driver as this resource.
INTEL_GPU_RESOURCE = "gpu.intel.com/i915"

# oneCCL (Intel's collectives) in Ray pods: one CCL worker thread per rank, libfabric's
# transport layer.
_CCL_ENV = {"CCL_WORKER_COUNT": "1", "CCL_ATL_TRANSPORT": "ofi"}
# oneCCL between Intel GPUs of different pods: IPC handles over sockets, libfabric over TCP
# (no RDMA assumed).
_CCL_GPU_ENV = {**_CCL_ENV, "CCL_ZE_IPC_EXCHANGE": "sockets", "FI_PROVIDER": "tcp"}


@dataclass(frozen=True)
class Profile:
    accelerator: str  # cpu | nvidia-gpu | intel-gpu (compute.accelerator)
    ipex: bool  # Intel Extension for PyTorch (compute.ipex)
    device_type: str  # torch device type: cpu | cuda | xpu
    dist_backend: str  # torch.distributed backend: gloo | nccl | xccl (torch's XPU) | ccl (oneCCL)
    ds_accelerator: str  # DS_ACCELERATOR: DeepSpeed picks its accelerator at import, else probes
    variant: str  # image variant: cpu, nvidia, intel (IPEX on Xeons) or xpu (Intel GPUs)
    device_resource: str | None  # extended resource of one device, e.g. nvidia.com/gpu
    ccl_env: dict[str, str] = field(default_factory=dict)  # oneCCL settings, where it runs

    @property
    def ray_use_gpu(self) -> bool:
        """Ray Train's `ScalingConfig(use_gpu=...)`: Ray's GPU handling (CUDA_VISIBLE_DEVICES,
        the worker's torch device) is CUDA's; Intel GPUs are requested as a plain resource."""
        return self.device_type == "cuda"

    def pod_env(self) -> dict[str, str]:
        """The accelerator's environment in every Ray pod, e.g. {"DS_ACCELERATOR": "cpu"}."""
        return {"DS_ACCELERATOR": self.ds_accelerator, **self.ccl_env}

    def ray_start_params(self, devices: int) -> dict[str, str]:
        """KubeRay derives num-gpus from nvidia.com/gpu only; Intel GPUs are declared here."""
        intel_gpu = self.device_resource == INTEL_GPU_RESOURCE
        return {"num-gpus": str(devices)} if devices and intel_gpu else {}


def profile(accelerator: str, ipex: bool = False) -> Profile:
    if accelerator == "nvidia-gpu":
        return Profile(
            accelerator, False, "cuda", "nccl", "cuda", "nvidia", NVIDIA_GPU_RESOURCE, {}
        )
    if accelerator == "intel-gpu":
        # The XPU image: torch / IPEX XPU builds and Intel's GPU user-space runtime. IPEX's
        # oneCCL bindings register "ccl"; torch >= 2.8 ships "xccl" for XPU itself.
        backend = "ccl" if ipex else "xccl"
        return Profile(
            accelerator, ipex, "xpu", backend, "xpu", "xpu", INTEL_GPU_RESOURCE, _CCL_GPU_ENV
        )
    if ipex:
        # The Intel image (torch 2.8 + IPEX 2.8) on Xeons; oneCCL for the gloo-less path.
        return Profile(accelerator, True, "cpu", "gloo", "cpu", "intel", None, _CCL_ENV)
    return Profile(accelerator, False, "cpu", "gloo", "cpu", "cpu", None, {})
