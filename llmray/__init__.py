"""llmray: fine-tune and serve open LLMs on Kubernetes (KubeRay) or on one machine."""

__version__ = "0.1.0"
