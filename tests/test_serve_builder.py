"""The RayService's import_path as Ray Serve calls it: `args` from serveConfigV2, through
Serve's own builder check (no cluster needed)."""

from __future__ import annotations

import yaml
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from llmray.api import parse_llmdeployment
from llmray_operator import rayservice
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings


def test_serve_config_args_build_the_application_as_ray_serve_builds_it():
    """Serve accepts a builder of exactly one parameter: a second, keyword-only one made every
    RayService deploy fail (DEPLOY_FAILED, found by the KubeRay replay)."""
    dep = parse_llmdeployment(
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "tiny", "namespace": "ml"},
            "spec": {"model": {"uri": "s3://models/tiny"}},
        }
    )
    owner = Owner("llmray.io/v1alpha1", "LLMDeployment", "tiny", "ml", "uid")
    service = rayservice.build(dep, owner, "s3://models/tiny", Settings())
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    built = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    assert isinstance(built, Application)
