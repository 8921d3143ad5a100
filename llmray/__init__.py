"""llmray: fine-tune and serve open LLMs on Kubernetes (KubeRay) or on one machine."""

# The one place the version is written: the package (pyproject reads it), the image tags the
# operator defaults to and `make images` builds; Chart.yaml's version / appVersion and the
# Dockerfiles' ARG VERSION are copies, held equal by tests/test_versions.py.
__version__ = "0.1.0"
