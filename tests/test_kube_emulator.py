"""The Kubernetes API emulator (tests/kube) as real clients see it: raw HTTP, kr8s, and kopf."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import textwrap
from pathlib import Path

import kmock
import kopf
import kr8s
import kr8s.asyncio
import pytest
from kopf.testing import KopfRunner
from kr8s.asyncio.objects import ConfigMap, Pod, new_class

from tests.kube.emulator import KubeEmulator, emulated_cluster, merge_patch
from tests.kube.schema import CrdSchema

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "third_party" / "kuberay-crds"
RAYJOB_CRD = KUBERAY / "ray.io_rayjobs.yaml"
FINETUNE_CRD = ROOT / "crds" / "llmray.io_finetunejobs.yaml"
RAYJOBS = "ray.io/v1/rayjobs"
FTJ = "llmray.io/v1alpha1/finetunejobs"
CM_PATH = "/api/v1/namespaces/ns1/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}

pytestmark = [pytest.mark.timeout(60)]

RayJob = new_class(kind="RayJob", version="ray.io/v1", namespaced=True)

RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "train", "namespace": "ns1"},
    "spec": {
        "entrypoint": "python train.py",
        "rayClusterSpec": {
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": {
                    "spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}
                },
            }
        },
    },
}
FINETUNEJOB = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bot", "namespace": "ns1"},
    "spec": {
        "baseModel": {"uri": "hf://org/model"},
        "dataset": {"train": "s3://bucket/train.jsonl"},
        "method": "lora",
    },
}


@pytest.fixture
async def cluster(tmp_path):
    async with emulated_cluster(tmp_path, [RAYJOB_CRD, FINETUNE_CRD]) as (kube, kubeconfig):
        yield kube, kubeconfig


@pytest.fixture
async def kube(cluster):
    return cluster[0]


@pytest.fixture
async def api(cluster):
    return await kr8s.asyncio.api(kubeconfig=str(cluster[1]))


def configmap(name: str, namespace: str = "ns1", **metadata) -> dict:
    meta = {"name": name, "namespace": namespace, **metadata}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


async def call(kube, method: str, path: str, body=None, **kwargs) -> tuple[int, dict]:
    """A raw request through kmock's client; (status, JSON body)."""
    if body is not None:
        kwargs["data"] = json.dumps(body)
        kwargs.setdefault("headers", {"Content-Type": "application/json"})
    async with kube.request(method, path, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def watch(kube, path: str, count: int | None = None, **params) -> list[dict]:
    """Read a watch stream until `count` events arrived or the server ended it."""
    events = []
    async with kube.get(path, params={"watch": "true", **params}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            events.append(json.loads(line))
            if count is not None and len(events) >= count:
                break
    return events


# -- discovery -----------------------------------------------------------------------------------


async def test_discovery_lists_resources_and_subresources(kube):
    status, version = await call(kube, "GET", "/version/")  # kr8s asks with a trailing slash
    assert status == 200 and (int(version["major"]), int(version["minor"])) >= (1, 30)

    _, core = await call(kube, "GET", "/api/v1/")
    names = {r["name"]: r for r in core["resources"]}
    assert {"configmaps", "events", "pods", "pods/log", "namespaces", "secrets"} <= set(names)
    assert names["namespaces"]["namespaced"] is False and names["pods"]["shortNames"] == ["po"]

    _, groups = await call(kube, "GET", "/apis")
    assert {g["name"] for g in groups["groups"]} >= {"ray.io", "llmray.io"}
    _, group = await call(kube, "GET", "/apis/ray.io")
    assert group["preferredVersion"]["groupVersion"] == "ray.io/v1"
    _, ray = await call(kube, "GET", "/apis/ray.io/v1")
    assert [r["name"] for r in ray["resources"]] == ["rayjobs", "rayjobs/status"]
    rayjobs = ray["resources"][0]
    assert rayjobs["kind"] == "RayJob" and rayjobs["namespaced"] is True
    assert {"create", "delete", "get", "list", "patch", "update", "watch"} <= set(rayjobs["verbs"])
    _, ours = await call(kube, "GET", "/apis/llmray.io/v1alpha1")
    assert ours["resources"][0]["shortNames"] == ["ftj"]

    assert (await call(kube, "GET", "/apis/nope.io/v1"))[0] == 404
    assert kube.api_calls == []  # discovery is not an API call for RBAC


# -- CRUD ----------------------------------------------------------------------------------------


async def test_kr8s_create_get_patch_list_delete(kube, api):
    cm = await ConfigMap(configmap("settings", labels={"app": "bot"}), api=api)
    await cm.create()
    meta = cm.raw["metadata"]
    assert meta["namespace"] == "ns1" and meta["generation"] == 1 and len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z") and int(meta["resourceVersion"]) > 0

    fetched = await ConfigMap.get("settings", namespace="ns1", api=api)
    assert fetched.raw == kube.get_object("v1/configmaps", "ns1", "settings")
    await fetched.patch({"data": {"k": "v2", "extra": "x"}})
    assert fetched.raw["data"] == {"k": "v2", "extra": "x"}
    assert int(fetched.raw["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    await fetched.patch({"data": {"extra": None}})  # merge patch: null deletes
    assert kube.get_object("v1/configmaps", "ns1", "settings")["data"] == {"k": "v2"}

    listed = [o.name async for o in api.get("configmaps", namespace=kr8s.ALL)]
    assert listed == ["settings"]
    await fetched.delete()
    assert not await fetched.exists()
    assert kube.get_object("v1/configmaps", "ns1", "settings") is None

    verbs = [(verb, resource, ns) for verb, _, resource, _, ns in kube.api_calls]
    assert ("create", "configmaps", "ns1") in verbs and ("patch", "configmaps", "ns1") in verbs
    assert ("list", "configmaps", None) in verbs and ("delete", "configmaps", "ns1") in verbs


async def test_errors_are_status_bodies(kube):
    status, body = await call(kube, "GET", f"{CM_PATH}/missing")
    assert (status, body["kind"], body["reason"], body["code"]) == (404, "Status", "NotFound", 404)
    assert body["message"] == 'configmaps "missing" not found'

    assert (await call(kube, "POST", CM_PATH, configmap("a")))[0] == 201
    status, body = await call(kube, "POST", CM_PATH, configmap("a"))
    assert (status, body["reason"]) == (409, "AlreadyExists")
    status, body = await call(kube, "POST", CM_PATH, configmap("b", namespace="other"))
    assert (status, body["reason"]) == (400, "BadRequest")

    stale = configmap("a", resourceVersion="1")
    status, body = await call(kube, "PUT", f"{CM_PATH}/a", stale)
    assert (status, body["reason"]) == (409, "Conflict")
    assert (await call(kube, "POST", f"{CM_PATH}/a", configmap("a")))[0] == 405
    status, body = await call(kube, "GET", "/apis/ray.io/v1/namespaces/ns1/nothings")
    assert (status, body["reason"]) == (404, "NotFound")
    assert (await call(kube, "GET", "/apis/ray.io/v1/rayjobs/x"))[0] == 404  # namespaced kind
    apply = {"Content-Type": "application/apply-patch+yaml"}
    assert (await call(kube, "PATCH", f"{CM_PATH}/a", {}, headers=apply))[0] == 415
    status, body = await call(kube, "GET", CM_PATH, params={"fieldSelector": "data.k=v"})
    assert (status, body["reason"]) == (400, "BadRequest")


async def test_namespace_comes_from_the_url_and_cluster_wide_lists_see_all(kube):
    for ns in ("a", "b"):
        body = configmap("same")
        del body["metadata"]["namespace"]
        status, created = await call(kube, "POST", f"/api/v1/namespaces/{ns}/configmaps/", body)
        assert status == 201 and created["metadata"]["namespace"] == ns
    _, everywhere = await call(kube, "GET", "/api/v1/configmaps")
    assert [o["metadata"]["namespace"] for o in everywhere["items"]] == ["a", "b"]
    assert everywhere["kind"] == "ConfigMapList"
    assert everywhere["metadata"]["resourceVersion"] == str(kube._rv)
    _, only_b = await call(kube, "GET", "/api/v1/namespaces/b/configmaps")
    assert len(only_b["items"]) == 1


async def test_generate_name_and_events_are_stored(kube):
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "kopf-event-"},
        "involvedObject": {"kind": "FineTuneJob", "name": "bot", "namespace": "ns1"},
        "reason": "Started",
        "type": "Normal",
    }
    status, body = await call(kube, "POST", "/api/v1/namespaces/ns1/events", event)
    assert status == 201 and body["metadata"]["name"].startswith("kopf-event-")
    selector = "involvedObject.name=bot,reason=Started"
    _, found = await call(kube, "GET", "/api/v1/events", params={"fieldSelector": selector})
    assert [e["metadata"]["name"] for e in found["items"]] == [body["metadata"]["name"]]


async def test_two_hundred_concurrent_creates(kube):
    results = await asyncio.gather(
        *(call(kube, "POST", CM_PATH, configmap(f"cm-{i}")) for i in range(200))
    )
    assert {status for status, _ in results} == {201}
    versions = {body["metadata"]["resourceVersion"] for _, body in results}
    assert len(versions) == 200
    assert len(kube.list_objects("v1/configmaps", "ns1")) == 200


# -- selectors -----------------------------------------------------------------------------------


async def test_label_and_field_selectors(kube, api):
    labels = [{"app": "bot", "tier": "a"}, {"app": "bot", "tier": "b"}, {"app": "web"}, {}]
    for i, lbls in enumerate(labels):
        await kube.apply_object(configmap(f"c{i}", labels=lbls))

    async def names(**params):
        status, body = await call(kube, "GET", CM_PATH, params=params)
        assert status == 200, body
        return [o["metadata"]["name"] for o in body["items"]]

    assert await names(labelSelector="app=bot") == ["c0", "c1"]
    assert await names(labelSelector="app!=bot") == ["c2", "c3"]
    assert await names(labelSelector="app") == ["c0", "c1", "c2"]
    assert await names(labelSelector="!app") == ["c3"]
    assert await names(labelSelector="app==bot,tier=b") == ["c1"]
    assert await names(labelSelector="tier in (a, b),app") == ["c0", "c1"]
    assert await names(labelSelector="app notin (bot)") == ["c2", "c3"]
    assert await names(fieldSelector="metadata.name=c2,metadata.name=c2") == ["c2"]  # as kr8s
    assert await names(fieldSelector="metadata.namespace=ns1,metadata.name!=c0") == [
        "c1",
        "c2",
        "c3",
    ]
    assert await names(fieldSelector="metadata.namespace=other") == []

    found = [o.name async for o in api.get("configmaps", namespace="ns1", label_selector="tier=b")]
    assert found == ["c1"]


# -- watch ---------------------------------------------------------------------------------------


async def test_watch_from_a_list_sees_every_later_event_in_order(kube, api):
    for i in range(3):
        await kube.apply_object(configmap(f"old-{i}"))
    _, listed = await call(kube, "GET", CM_PATH)
    since = listed["metadata"]["resourceVersion"]

    expected: list[tuple[str, str, str]] = []

    async def writer():
        for i in range(10):
            _, body = await call(kube, "POST", CM_PATH, configmap(f"new-{i}"))
            expected.append(
                ("ADDED", body["metadata"]["name"], body["metadata"]["resourceVersion"])
            )
            _, body = await call(
                kube, "PATCH", f"{CM_PATH}/old-{i % 3}", {"data": {"i": str(i)}}, headers=MERGE
            )
            expected.append(("MODIFIED", f"old-{i % 3}", body["metadata"]["resourceVersion"]))
            if i % 4 == 3:
                _, body = await call(kube, "DELETE", f"{CM_PATH}/new-{i}")
                expected.append(("DELETED", f"new-{i}", body["metadata"]["resourceVersion"]))
            await asyncio.sleep(0)

    async def watcher():
        await asyncio.sleep(0.01)  # start while the writer is busy: replay + live must join
        seen = []
        async for kind, obj in api.async_watch("configmaps", namespace="ns1", since=since):
            seen.append((kind, obj.name, obj.metadata.resourceVersion))
            if len(seen) == 10 + 10 + 2:  # created, patched, deleted (i = 3, 7)
                return seen
        return seen

    seen, _ = await asyncio.wait_for(asyncio.gather(watcher(), writer()), timeout=10)
    assert seen == expected
    assert [int(rv) for _, _, rv in seen] == sorted(int(rv) for _, _, rv in seen)


async def test_watch_without_version_starts_with_synthetic_added_then_goes_live(kube):
    await kube.apply_object(configmap("one", labels={"app": "x"}))
    await kube.apply_object(configmap("two"))

    async def later():
        await asyncio.sleep(0.1)
        await kube.apply_object(configmap("three", labels={"app": "x"}))
        await kube.delete_object("v1/configmaps", "ns1", "one")

    events, _ = await asyncio.gather(
        watch(kube, "/api/v1/configmaps", count=3, labelSelector="app=x"), later()
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "one"),
        ("ADDED", "three"),
        ("DELETED", "one"),
    ]


async def test_selector_watch_turns_modifications_into_added_and_deleted(kube):
    _, created = await call(kube, "POST", CM_PATH, configmap("c"))
    since = created["metadata"]["resourceVersion"]
    for app in ("x", "y", "x"):
        await call(
            kube, "PATCH", f"{CM_PATH}/c", {"metadata": {"labels": {"app": app}}}, headers=MERGE
        )
    events = await watch(kube, CM_PATH, count=3, resourceVersion=since, labelSelector="app=x")
    assert [e["type"] for e in events] == ["ADDED", "DELETED", "ADDED"]


async def test_expired_resource_version_gets_410(tmp_path):
    async with KubeEmulator(event_log_size=5) as kube, kmock.Server(kube) as server:
        kube.register_builtin("v1", "configmaps", "ConfigMap")
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", server)
        for i in range(10):
            await kube.apply_object(configmap(f"c{i}"))
        events = await watch(kube, CM_PATH, resourceVersion="2")
        assert len(events) == 1 and events[0]["type"] == "ERROR"
        assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"
        _, listed = await call(kube, "GET", CM_PATH)
        since = str(int(listed["metadata"]["resourceVersion"]) - 2)
        recent = await watch(kube, CM_PATH, count=2, resourceVersion=since)
        assert [e["object"]["metadata"]["name"] for e in recent] == ["c8", "c9"]
        # NB: kr8s 0.20's async_watch() retries a 410 with the same resourceVersion, forever.
        assert kubeconfig.read_text().count(f"http://127.0.0.1:{server.port}") == 1


async def test_timeout_seconds_ends_a_watch(kube):
    """The stream stays open (a later change arrives), then the server ends it cleanly."""

    async def change_later():
        await asyncio.sleep(0.3)
        await kube.apply_object(configmap("late"))

    changer = asyncio.create_task(change_later())
    events = await asyncio.wait_for(watch(kube, CM_PATH, timeoutSeconds="2"), 30)
    await changer
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "late")]


async def test_initial_events_end_with_a_bookmark(kube):
    await kube.apply_object(configmap("c"))
    params = {"sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan"}
    events = await watch(kube, CM_PATH, count=2, allowWatchBookmarks="true", **params)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    bookmark = events[1]["object"]["metadata"]
    assert bookmark["annotations"] == {"k8s.io/initial-events-end": "true"}


# -- status, generation, patches ------------------------------------------------------------------


async def test_status_subresource(kube, api):
    job = await RayJob({**copy.deepcopy(RAYJOB), "status": {"jobStatus": "RUNNING"}}, api=api)
    await job.create()
    assert "status" not in job.raw  # dropped on create
    assert job.raw["spec"]["submissionMode"] == "K8sJobMode"  # a CRD default, filled in

    await job.patch({"spec": {"entrypoint": "python other.py"}, "status": {"jobStatus": "X"}})
    assert "status" not in job.raw and job.raw["metadata"]["generation"] == 2

    await job.patch(
        {"spec": {"suspend": True}, "status": {"jobStatus": "RUNNING"}}, subresource="status"
    )
    assert job.raw["status"]["jobStatus"] == "RUNNING"
    assert "suspend" not in job.raw["spec"] and job.raw["metadata"]["generation"] == 2

    await kube.patch_status(RAYJOBS, "ns1", "train", {"jobDeploymentStatus": "Complete"})
    stored = kube.get_object(RAYJOBS, "ns1", "train")
    assert stored["status"]["jobStatus"] == "RUNNING"
    assert stored["status"]["jobDeploymentStatus"] == "Complete"

    path = "/apis/ray.io/v1/namespaces/ns1/rayjobs/train/status"
    status, body = await call(kube, "PUT", path, job.raw)  # job.raw has an old resourceVersion
    assert (status, body["reason"]) == (409, "Conflict")
    status, body = await call(kube, "PUT", path, {**stored, "status": {"jobStatus": "FAILED"}})
    assert status == 200 and body["status"]["jobStatus"] == "FAILED"
    calls = [c for c in kube.api_calls if c.resource == "rayjobs"]
    assert ("patch", "ray.io", "rayjobs", "status", "ns1") in calls
    assert ("update", "ray.io", "rayjobs", "status", "ns1") in calls


async def test_generation_bumps_only_on_spec_changes_and_noop_patches_are_silent(kube):
    path = "/apis/ray.io/v1/namespaces/ns1/rayjobs"
    _, job = await call(kube, "POST", path, RAYJOB)
    rv = job["metadata"]["resourceVersion"]

    labels = {"metadata": {"labels": {"a": "b"}}}
    _, job = await call(kube, "PATCH", f"{path}/train", labels, headers=MERGE)
    assert job["metadata"]["generation"] == 1 and job["metadata"]["resourceVersion"] != rv
    rv = job["metadata"]["resourceVersion"]

    _, job = await call(kube, "PATCH", f"{path}/train", labels, headers=MERGE)  # no change
    assert job["metadata"]["resourceVersion"] == rv
    spec = {"spec": {"entrypoint": "python again.py"}}
    _, job = await call(kube, "PATCH", f"{path}/train", spec, headers=MERGE)
    assert job["metadata"]["generation"] == 2

    events = await watch(kube, path, count=1, resourceVersion=rv)
    assert [(e["type"], e["object"]["metadata"]["generation"]) for e in events] == [("MODIFIED", 2)]


async def test_json_patch_with_a_resource_version_test(kube):
    _, cm = await call(kube, "POST", CM_PATH, configmap("c"))
    rv = cm["metadata"]["resourceVersion"]
    json_patch = {"Content-Type": "application/json-patch+json"}
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/data/new", "value": "1"},
        {"op": "remove", "path": "/data/k"},
    ]
    status, body = await call(kube, "PATCH", f"{CM_PATH}/c", ops, headers=json_patch)
    assert status == 200 and body["data"] == {"new": "1"}
    status, body = await call(kube, "PATCH", f"{CM_PATH}/c", ops, headers=json_patch)  # stale
    assert (status, body["reason"]) == (422, "Invalid")
    strategic = {"Content-Type": "application/strategic-merge-patch+json"}
    status, body = await call(
        kube, "PATCH", f"{CM_PATH}/c", {"data": {"s": "2"}}, headers=strategic
    )
    assert body["data"] == {"new": "1", "s": "2"}


def test_merge_patch_follows_rfc_7386():
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    patched = merge_patch(target, {"a": {"b": None, "c": [3]}, "e": {"f": None}})
    assert patched == {"a": {"c": [3]}, "d": 1, "e": {}}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # untouched


# -- deletion ------------------------------------------------------------------------------------


async def test_finalizers_delay_deletion(kube):
    _, cm = await call(kube, "POST", CM_PATH, configmap("keep", finalizers=["example.com/keep"]))
    since = cm["metadata"]["resourceVersion"]
    status, body = await call(kube, "DELETE", f"{CM_PATH}/keep")
    assert status == 200 and body["metadata"]["deletionTimestamp"].endswith("Z")
    assert (await call(kube, "GET", f"{CM_PATH}/keep"))[0] == 200
    again = await call(kube, "DELETE", f"{CM_PATH}/keep")
    assert again[1]["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]

    add = {"metadata": {"finalizers": ["example.com/keep", "example.com/more"]}}
    status, body = await call(kube, "PATCH", f"{CM_PATH}/keep", add, headers=MERGE)
    assert (status, body["reason"]) == (422, "Invalid")  # no new finalizers while deleting

    release = {"metadata": {"finalizers": None}}
    assert (await call(kube, "PATCH", f"{CM_PATH}/keep", release, headers=MERGE))[0] == 200
    assert (await call(kube, "GET", f"{CM_PATH}/keep"))[0] == 404
    events = await watch(kube, CM_PATH, count=2, resourceVersion=since)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]


async def test_garbage_collection_by_owner_references(kube, api):
    job = await RayJob(copy.deepcopy(RAYJOB), api=api)
    await job.create()

    def owned_by(obj: dict) -> dict:
        meta = obj["metadata"]
        return {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
        }

    child = await kube.apply_object(configmap("child", ownerReferences=[owned_by(job.raw)]))
    await kube.apply_object(configmap("grandchild", ownerReferences=[owned_by(child)]))
    held = configmap("held", ownerReferences=[owned_by(job.raw)], finalizers=["example.com/x"])
    await kube.apply_object(held)
    other = await kube.apply_object(configmap("other"))
    await kube.apply_object(
        configmap("two-owners", ownerReferences=[owned_by(job.raw), owned_by(other)])
    )

    await job.delete()
    remaining = {o["metadata"]["name"]: o for o in kube.list_objects("v1/configmaps")}
    assert set(remaining) == {"held", "other", "two-owners"}
    assert remaining["held"]["metadata"]["deletionTimestamp"]
    assert kube.get_object(RAYJOBS, "ns1", "train") is None


# -- validation ----------------------------------------------------------------------------------


async def test_invalid_objects_get_422_with_causes(kube, api):
    bad = copy.deepcopy(RAYJOB)
    bad["spec"]["bogus"] = 1
    with pytest.raises(kr8s.ServerError) as raised:
        await (await RayJob(bad, api=api)).create()
    body = raised.value.status
    assert raised.value.response.status_code == 422 and body["reason"] == "Invalid"
    assert body["details"]["causes"] == [
        {"reason": "FieldValueUnknown", "message": "unknown field", "field": "spec.bogus"}
    ]
    assert "spec.bogus" in body["message"]

    ftj = copy.deepcopy(FINETUNEJOB)
    ftj["spec"]["method"] = "magic"
    status, body = await call(
        kube, "POST", "/apis/llmray.io/v1alpha1/namespaces/ns1/finetunejobs", ftj
    )
    assert (status, body["reason"]) == (422, "Invalid")
    assert 'spec.method: Unsupported value: "magic"' in body["message"]

    ok = await RayJob(copy.deepcopy(RAYJOB), api=api)
    await ok.create()  # rayStartParams is a map of strings: any key is fine
    with pytest.raises(kr8s.ServerError):
        await ok.patch(
            {"spec": {"rayClusterSpec": {"headGroupSpec": {"rayStartParams": {"x": 1}}}}}
        )

    lenient = "/apis/ray.io/v1/namespaces/ns1/rayjobs?fieldValidation=Warn"
    other = {**copy.deepcopy(bad), "metadata": {"name": "pruned"}}
    async with kube.post(lenient, json=other) as resp:
        assert resp.status == 201 and "spec.bogus" in resp.headers["Warning"]
        assert "bogus" not in (await resp.json())["spec"]


def test_schema_validates_the_real_crds():
    rayjob = CrdSchema.from_file(RAYJOB_CRD)
    assert (rayjob.group, rayjob.version, rayjob.plural, rayjob.kind) == (
        "ray.io",
        "v1",
        "rayjobs",
        "RayJob",
    )
    assert rayjob.namespaced and rayjob.status_subresource
    assert rayjob.validate(RAYJOB) == []

    bad = copy.deepcopy(RAYJOB)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["template"]["spec"]["containers"] += [{"name": "ray-head", "image": 1, "extra": True}]
    head["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    bad["metadata"]["name"] = "Not_A_Name"
    containers = "spec.rayClusterSpec.headGroupSpec.template.spec.containers"
    assert rayjob.validate(bad) == [
        "metadata.name: " + rayjob.errors(bad)[0].detail,
        f'{containers}[0].ports[0].containerPort: Invalid value: "string": must be of type integer',
        f'{containers}[1]: Duplicate value: {{"name": "ray-head"}}',
        f"{containers}[1].extra: unknown field",
        f'{containers}[1].image: Invalid value: "integer": must be of type string',
    ]

    for name in ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"):
        schema = CrdSchema.from_file(KUBERAY / name)
        obj = {"apiVersion": schema.api_version, "kind": schema.kind, "metadata": {"name": "x"}}
        assert schema.validate({**obj, "spec": {}}) != []  # both have required spec fields
    finetune = CrdSchema.from_file(FINETUNE_CRD)
    assert finetune.validate(FINETUNEJOB) == []
    assert finetune.short_names == ("ftj",)
    deployments = CrdSchema.from_file(ROOT / "crds" / "llmray.io_llmdeployments.yaml")
    assert deployments.kind == "LLMDeployment" and deployments.status_subresource


TOY_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "toys.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Toy", "plural": "toys", "shortNames": ["ty"]},
        "scope": "Cluster",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {
                                        "x-kubernetes-int-or-string": True,
                                        "anyOf": [{"type": "integer"}, {"type": "string"}],
                                    },
                                    "count": {
                                        "type": "integer",
                                        "format": "int32",
                                        "minimum": 0,
                                        "exclusiveMinimum": True,
                                    },
                                    "ratio": {"type": "number", "maximum": 1, "nullable": True},
                                    "name": {
                                        "type": "string",
                                        "pattern": "^[a-z]+$",
                                        "maxLength": 5,
                                    },
                                    "color": {
                                        "type": "string",
                                        "enum": ["red", "blue"],
                                        "default": "red",
                                    },
                                    "tags": {
                                        "type": "array",
                                        "items": {"type": "string"},
                                        "maxItems": 2,
                                        "x-kubernetes-list-type": "set",
                                    },
                                    "env": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                        "maxProperties": 1,
                                    },
                                    "free": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                    "template": {
                                        "type": "object",
                                        "x-kubernetes-embedded-resource": True,
                                        "properties": {"spec": {"type": "object"}},
                                    },
                                    "when": {"type": "string", "format": "date-time"},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.mark.parametrize(
    ("spec", "errors"),
    [
        ({"size": 1, "free": {"any": {"thing": 1}}}, []),
        ({"size": "50%", "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {}}}, []),
        ({"size": 1.5}, ['spec.size: Invalid value: "number": must be of type integer or string']),
        ({}, ["spec.size: Required value"]),
        ({"size": 1, "count": 0}, ["spec.count: Invalid value: 0: should be greater than 0"]),
        (
            {"size": 1, "count": 2**31},
            ["spec.count: Invalid value: 2147483648: must be of format int32"],
        ),
        ({"size": 1, "ratio": None}, []),
        (
            {"size": 1, "ratio": 2},
            ["spec.ratio: Invalid value: 2: should be less than or equal to 1"],
        ),
        (
            {"size": 1, "name": "abc1"},
            ["spec.name: Invalid value: \"abc1\": should match '^[a-z]+$'"],
        ),
        ({"size": 1, "name": "abcdef"}, ["spec.name: Too long: may not be more than 5 bytes"]),
        (
            {"size": 1, "color": "green"},
            ['spec.color: Unsupported value: "green": supported values: "red", "blue"'],
        ),
        ({"size": 1, "tags": ["a", "a"]}, ['spec.tags: Duplicate value: ["a", "a"]']),
        (
            {"size": 1, "tags": ["a", "b", "c"]},
            ["spec.tags: Too many: 3: must have at most 2 items"],
        ),
        (
            {"size": 1, "env": {"A": 1}},
            ['spec.env.A: Invalid value: "integer": must be of type string'],
        ),
        (
            {"size": 1, "env": {"A": "1", "B": "2"}},
            ["spec.env: Too many: 2: must have at most 1 items"],
        ),
        (
            {"size": 1, "template": {"spec": {}, "status": {}}},
            ["spec.template.status: unknown field"],
        ),
        (
            {"size": 1, "when": "yesterday"},
            ['spec.when: Invalid value: "yesterday": must be of format date-time'],
        ),
        ({"size": 1, "when": "2024-01-02T03:04:05Z", "bogus": 1}, ["spec.bogus: unknown field"]),
    ],
)
def test_schema_rules(spec, errors):
    schema = CrdSchema.from_dict(TOY_CRD)
    assert (schema.namespaced, schema.status_subresource, schema.short_names) == (
        False,
        False,
        ("ty",),
    )
    assert (
        schema.validate(
            {"apiVersion": "example.com/v1", "kind": "Toy", "metadata": {"name": "t"}, "spec": spec}
        )
        == errors
    )


def test_schema_normalizes_like_the_server():
    schema = CrdSchema.from_dict(TOY_CRD)
    obj = {"spec": {"size": 1, "name": None, "ratio": None}}
    assert schema.normalize(obj) == {"spec": {"size": 1, "ratio": None, "color": "red"}}
    assert schema.prune_unknown({"spec": {"size": 1, "x": 1}, "y": 2}) == (
        {"spec": {"size": 1}},
        ["spec.x", "y"],
    )


# -- pods/log, reactions -------------------------------------------------------------------------


async def test_pod_logs(kube, api):
    await kube.apply_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "submitter", "namespace": "ns1"},
            "spec": {"containers": [{"name": "c", "image": "ray"}]},
            "status": {"phase": "Running"},
        }
    )
    kube.set_pod_log("ns1", "submitter", "one\ntwo\nthree\n")
    pod = await Pod.get("submitter", namespace="ns1", api=api)
    assert pod.raw["status"] == {"phase": "Running"}
    assert [line async for line in pod.logs(tail_lines=2)] == ["two", "three"]
    status, body = await call(kube, "GET", "/api/v1/namespaces/ns1/pods/missing/log")
    assert (status, body["reason"]) == (404, "NotFound")
    assert ("get", "", "pods", "log", "ns1") in kube.api_calls
    _, running = await call(
        kube, "GET", "/api/v1/pods", params={"fieldSelector": "status.phase=Running"}
    )
    assert [p["metadata"]["name"] for p in running["items"]] == ["submitter"]


async def test_reactions_added_by_a_test_take_precedence(kube):
    kube["get /api/v1/namespaces/ns1/secrets"] << 503
    assert (await call(kube, "GET", "/api/v1/namespaces/ns1/secrets"))[0] == 503
    assert (await call(kube, "GET", "/api/v1/namespaces/ns2/secrets"))[0] == 200


# -- a real kopf operator --------------------------------------------------------------------------

OPERATOR = """
import kopf


@kopf.on.login()
def login(**kwargs):
    # Explicit: kopf's fallback logins are chosen when its registry is created, and the one that
    # reads $KUBECONFIG exists only if neither `kubernetes` nor `pykube` is importable.
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llmray.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="llmray.io")
    settings.watching.server_timeout = 10


@kopf.on.create("llmray.io", "v1alpha1", "finetunejobs")
def created(body, patch, **_):
    patch.status["phase"] = "Pending"
    kopf.info(body, reason="Accepted", message="accepted by the tiny operator")
"""


async def test_a_real_kopf_operator_runs_against_the_emulator(cluster, api, tmp_path, monkeypatch):
    kube, kubeconfig = cluster
    script = tmp_path / "tiny_operator.py"
    script.write_text(textwrap.dedent(OPERATOR))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(sys, "path", list(sys.path))  # kopf prepends the script's folder
    previous_registry = kopf.get_default_registry()
    runner = KopfRunner(
        ["run", "--standalone", "-A", "--verbose", str(script)],
        registry=kopf.OperatorRegistry(),  # not the handlers that other tests imported
        timeout=30,
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        ftj = new_class(kind="FineTuneJob", version="llmray.io/v1alpha1", namespaced=True)
        await (await ftj(copy.deepcopy(FINETUNEJOB), api=api)).create()
        done = lambda o: (o.get("status") or {}).get("phase") == "Pending"  # noqa: E731
        job = await kube.wait_for_object(FTJ, "ns1", "bot", done, timeout=15)
        for _ in range(200):
            events = [e for e in kube.list_objects("v1/events", "ns1") if e["reason"] == "Accepted"]
            if events:
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        kopf.set_default_registry(previous_registry)

    assert runner.exit_code == 0 and "Traceback" not in runner.output, runner.output
    assert job["metadata"]["generation"] == 1  # kopf's annotations and status are not spec
    assert job["metadata"]["annotations"]["llmray.io/last-handled-configuration"]
    assert events and events[0]["involvedObject"]["uid"] == job["metadata"]["uid"]
    assert events[0]["message"] == "accepted by the tiny operator"
    calls = set(kube.api_calls)
    assert ("list", "llmray.io", "finetunejobs", None, None) in calls  # cluster-wide (-A)
    assert ("watch", "llmray.io", "finetunejobs", None, None) in calls
    assert ("patch", "llmray.io", "finetunejobs", "status", "ns1") in calls
    assert ("create", "", "events", None, "ns1") in calls
