"""The few Kubernetes API calls the operator makes, over kr8s (kubeconfig or in-cluster).

Each method is one request with one RBAC verb; the Helm chart's ClusterRole grants exactly
these (`rbac.py`; tests/test_operator_integration.py checks them against the request log of
a real run).
"""

from __future__ import annotations

import json
from typing import Any

import jsonpointer
import kr8s
import kr8s.asyncio

from llmray_operator.resources import CHILDREN, PODS, Resource


def _pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) to a field of an object, escaped by jsonpointer."""
    return jsonpointer.JsonPointer.from_parts(parts).path


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeApi:
    def __init__(self, api: Any) -> None:
        self._api = api

    @classmethod
    async def connect(cls) -> KubeApi:
        """KUBECONFIG / ~/.kube/config, or the pod's service account in a cluster."""
        return cls(await kr8s.asyncio.api())

    async def _call(
        self,
        method: str,
        res: Resource,
        namespace: str | None,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, Any] | None = None,
    ) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["content"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": content_type}
        if params:
            kwargs["params"] = params
        try:
            async with self._api.call_api(
                method,
                version=res.api_version,
                base="/apis" if res.group else "/api",
                namespace=namespace,
                url=path,
                **kwargs,
            ) as response:
                return (
                    response.json()
                    if "json" in response.headers.get("content-type", "")
                    else response.text
                )
        except kr8s.ServerError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            raise ApiError(status, str(exc)) from exc

    async def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", res, namespace, f"{res.plural}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def ensure(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the object, created?): an existing one with the same name is returned as it is,
        so a restarted operator or a concurrent pass never duplicates a child."""
        res = CHILDREN[obj["kind"]]
        meta = obj["metadata"]
        existing = await self.get(res, meta["namespace"], meta["name"])
        if existing is not None:
            return existing, False
        try:
            return await self._call("POST", res, meta["namespace"], res.plural, body=obj), True
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = await self.get(res, meta["namespace"], meta["name"])
        if existing is None:  # deleted in between: the next pass creates it
            raise ApiError(409, f"{obj['kind']} {meta['name']} exists and vanished")
        return existing, False

    async def replace_spec(
        self,
        res: Resource,
        existing: dict[str, Any],
        spec: dict[str, Any],
        annotations: dict[str, str],
    ) -> dict[str, Any]:
        """Set the whole spec of `existing` (a JSON patch `replace`: fields we dropped go away
        too) and merge `annotations` into its own."""
        meta = existing["metadata"]
        ops: list[dict[str, Any]] = [{"op": "replace", "path": _pointer("spec"), "value": spec}]
        if "annotations" not in meta:
            ops.append(
                {"op": "add", "path": _pointer("metadata", "annotations"), "value": annotations}
            )
        else:
            for key, value in annotations.items():
                # e.g. /metadata/annotations/llmray.io~1spec-hash
                path = _pointer("metadata", "annotations", key)
                ops.append({"op": "add", "path": path, "value": value})
        return await self._call(
            "PATCH",
            res,
            meta["namespace"],
            f"{res.plural}/{meta['name']}",
            body=ops,
            content_type="application/json-patch+json",
        )

    async def patch_status(
        self, res: Resource, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            res,
            namespace,
            f"{res.plural}/{name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def job_log_tail(self, namespace: str, job_name: str, lines: int = 100) -> str | None:
        """The last lines of the newest pod of Kubernetes Job `job_name` (KubeRay's submitter,
        which follows the Ray job's driver output), or None when it has no pod yet."""
        listing = await self._call(
            "GET",
            PODS,
            namespace,
            "pods",
            params={"labelSelector": f"batch.kubernetes.io/job-name={job_name}"},
        )
        items = sorted(
            listing.get("items") or [],
            key=lambda p: p["metadata"].get("creationTimestamp") or "",
        )
        if not items:
            return None
        pod = items[-1]["metadata"]["name"]
        try:
            return await self._call(
                "GET", PODS, namespace, f"pods/{pod}/log", params={"tailLines": lines}
            )
        except ApiError as exc:
            if exc.status in (400, 404):  # container not started yet, or pod gone
                return None
            raise
