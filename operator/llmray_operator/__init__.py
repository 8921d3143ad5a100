"""The llmray operator: FineTuneJob -> KubeRay RayJob, LLMDeployment -> RayService.

Pure builders (`rayjob`, `rayservice`, `status`) turn a spec into the children and the
children's status into ours; `reconcile` converges one object; `handlers` wires it into kopf.
"""
