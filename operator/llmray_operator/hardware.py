"""Accelerator -> image variant, device resource name and environment: the one place for it.

Both builders (training and serving) read this, so a new accelerator is added here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmray_operator.settings import Images

# Intel's GPU device plugin advertises each GPU on the i915 kernel driver as this resource.
INTEL_GPU_RESOURCE = "gpu.intel.com/i915"


@dataclass(frozen=True)
class Profile:
    variant: str  # image variant: cpu, nvidia, intel (IPEX on Xeons) or xpu (Intel GPUs)
    device_resource: str | None  # extended resource of one device, e.g. nvidia.com/gpu
    env: dict[str, str] = field(default_factory=dict)

    def image(self, images: Images) -> str:
        return getattr(images, self.variant)

    def ray_start_params(self, devices: int) -> dict[str, str]:
        """KubeRay derives num-gpus from nvidia.com/gpu only; Intel GPUs are declared here."""
        intel_gpu = self.device_resource == INTEL_GPU_RESOURCE
        return {"num-gpus": str(devices)} if devices and intel_gpu else {}


def profile(accelerator: str, ipex: bool) -> Profile:
    if accelerator == "nvidia-gpu":
        return Profile("nvidia", "nvidia.com/gpu", {"DS_ACCELERATOR": "cuda"})
    if accelerator == "intel-gpu":
        # The XPU image: torch / IPEX XPU builds and Intel's GPU user-space runtime.
        return Profile(
            "xpu",
            INTEL_GPU_RESOURCE,
            {
                "DS_ACCELERATOR": "xpu",
                # oneCCL between Intel GPUs of different pods: IPC handles over sockets, one
                # CCL worker thread per rank, libfabric over TCP (no RDMA assumed).
                "CCL_ZE_IPC_EXCHANGE": "sockets",
                "CCL_WORKER_COUNT": "1",
                "CCL_ATL_TRANSPORT": "ofi",
                "FI_PROVIDER": "tcp",
            },
        )
    env = {"DS_ACCELERATOR": "cpu"}
    if ipex:
        # The Intel image (torch 2.8 + IPEX 2.8) on Xeons; oneCCL for the gloo-less path.
        env.update({"CCL_WORKER_COUNT": "1", "CCL_ATL_TRANSPORT": "ofi"})
        return Profile("intel", None, env)
    return Profile("cpu", None, env)
