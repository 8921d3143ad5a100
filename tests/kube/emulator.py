"""An in-process Kubernetes API server for integration tests, built on kmock.

:class:`KubeEmulator` is a :class:`kmock.KubernetesEmulator` that behaves like kube-apiserver for
what kopf (the operator framework) and kr8s (the operator's client for child objects) do::

    async with emulated_cluster(tmp_path, [CRDS / "llmray.io_finetunejobs.yaml"]) as (kube, cfg):
        api = await kr8s.asyncio.api(kubeconfig=cfg)
        ...
        assert kube.get_object("llmray.io/v1alpha1/finetunejobs", "ns", "job")["status"] == ...

kmock provides the HTTP server (``kmock.Server``), the request log (``list(kube)``, filtered as
``kube['patch /apis/ray.io/v1/namespaces/ns/rayjobs/x']``), the object history view
(``kube.objects``, read-only here) and the resource registry (``kube.resources``); reactions
added by a test (``kube['get /api/v1/pods'] << 500``) still take precedence over the emulation.
The parent's stateful handlers are replaced: see ``_handle``.

Emulated, as the real server does it:

* discovery (``/version``, ``/api``, ``/apis``, ``/apis/GROUP[/VERSION]``) of the registered
  resources, with subresources listed as ``PLURAL/status``; a trailing ``/`` on any path is ignored;
* create / get / list / watch / patch (merge, JSON, strategic-as-merge) / update (PUT) /
  delete / deletecollection, with namespaces from the URL, ``uid``, ``creationTimestamp``,
  ``generateName``, a global ``resourceVersion`` counter, ``generation`` (bumped on spec changes),
  optimistic concurrency (409 Conflict on a stale ``resourceVersion``);
* the ``status`` subresource: the main resource ignores ``status``, ``/status`` ignores the rest;
* finalizers (``deletionTimestamp`` first, removal once they are gone) and garbage collection of
  dependents by ``ownerReferences`` (background propagation; ``Orphan`` skips it);
* label and field selectors (``metadata.name``, ``metadata.namespace``, a few built-in fields,
  a CRD's ``selectableFields``);
* watches from any retained ``resourceVersion`` (no event is lost between a list and a watch),
  410 Expired for older ones, ``timeoutSeconds``, ``sendInitialEvents`` with its bookmark;
* CRD schema validation (see :mod:`tests.kube.schema`): 422 Invalid with ``details.causes``;
  unknown fields are errors by default (``fieldValidation=Ignore|Warn`` prunes them instead);
  nulls of non-nullable fields are dropped and schema defaults are filled in;
* ``pods/log`` with text set by the test (:meth:`KubeEmulator.set_pod_log`), ``tailLines``;
* errors as ``Status`` bodies: NotFound, AlreadyExists, Conflict, Invalid, BadRequest,
  MethodNotAllowed, UnsupportedMediaType, Expired.
* fault injection, when ``kube.faults`` is set (:mod:`tests.kube.faults`): 429 / 500 / 409 on
  a share of the requests that arrive over HTTP (some 500s after the change took effect),
  watch streams cut at random; ``kube.created`` counts creations, so a re-created object shows.

Deliberately left out: authentication and RBAC enforcement (:attr:`KubeEmulator.api_calls`
records the verbs for RBAC checks instead), admission webhooks, CEL rules, server-side apply and
field managers (``managedFields``), ``limit``/``continue`` paging (lists are never chunked),
reads at an old ``resourceVersion`` (lists always return the latest state), watch bookmarks other
than the initial-events one, foreground deletion (treated as background), namespace lifecycle
(namespaces need not exist; deleting one deletes nothing else), controllers of any kind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml

from tests.kube.faults import REASONS, Faults
from tests.kube.schema import CrdSchema, SchemaError, is_dns1123_subdomain

__all__ = [
    "ApiCall",
    "KubeEmulator",
    "ResourceType",
    "emulated_cluster",
    "merge_patch",
]

T = TypeVar("T")
Part = Literal["main", "status", "all"]  # which part of an object an update may change

_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_KMOCK_ACTIONS = {  # RBAC verb -> kmock's action (for kmock's request filters)
    "list": "LIST",
    "watch": "WATCH",
    "get": "FETCH",
    "create": "CREATE",
    "patch": "UPDATE",
    "update": "UPDATE",
    "delete": "DELETE",
}
_SUBRESOURCE_VERBS = {"status": ["get", "patch", "update"], "log": ["get"]}
_SERVER_METADATA = (  # set by the server only; whatever a client sends is ignored
    "uid",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
)
_WATCH_POLL = 0.25  # seconds between checks whether the server is still up
_NAME_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # as in the apiserver's generateName
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_PART = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")

# Fields that kube-apiserver accepts in fieldSelector for built-in kinds (besides metadata.*).
BUILTIN_SELECTABLE_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "events"): (
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "type",
    ),
    ("", "pods"): (
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ),
    ("", "secrets"): ("type",),
    ("", "namespaces"): ("status.phase",),
}


class ApiCall(NamedTuple):
    """One API request as RBAC sees it: ``("patch", "ray.io", "rayjobs", "status", "ns")``."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str
    resource: str
    subresource: str | None
    namespace: str | None


@attrs.frozen(kw_only=True)
class ResourceType:
    """A served resource: its names, scope, subresources, and (for CRDs) its schema."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    selectable_fields: tuple[str, ...] = ()
    schema: CrdSchema | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def group_resource(self) -> str:
        """As in error messages: ``rayjobs.ray.io``, ``configmaps``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """As in 422 messages: ``RayJob.ray.io``, ``ConfigMap``."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


ResourceRef = str | CrdSchema | ResourceType  # "ray.io/v1/rayjobs", "v1/configmaps", "RayJob"


@attrs.frozen
class _Route:
    """A parsed request path (``None`` for the parts that are absent)."""

    parts: tuple[str, ...]
    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @property
    def is_resource(self) -> bool:
        return self.plural is not None


def _parse_path(path: str) -> _Route:
    """``/apis/G/V/namespaces/NS/PLURAL/NAME/SUB`` and the like; empty segments are ignored."""
    parts = tuple(part for part in path.split("/") if part)
    if len(parts) < 2 or parts[0] not in ("api", "apis") or (parts[0] == "apis" and len(parts) < 3):
        return _Route(parts)
    group, rest = ("", list(parts[1:])) if parts[0] == "api" else (parts[1], list(parts[2:]))
    version, rest = rest[0], rest[1:]
    namespace = None
    namespace_itself = len(rest) <= 2 or (len(rest) == 3 and rest[2] in ("status", "finalize"))
    if rest and rest[0] == "namespaces" and not namespace_itself:
        namespace, rest = rest[1], rest[2:]
    plural, name, *subparts = rest + [None] * (3 - min(len(rest), 3))  # type: ignore[operator]
    subresource = "/".join(p for p in subparts if p) or None
    return _Route(parts, group, version, plural, namespace, name, subresource)


class _Event(NamedTuple):
    """A change as recorded in the event log; ``old`` is the previous state (for selectors)."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


@attrs.define(eq=False)
class _Watcher:
    """One open watch: its scope, its selectors, and a queue of events to send."""

    namespace: str | None
    matches: Callable[[Mapping[str, Any]], bool]
    queue: asyncio.Queue[dict[str, Any] | None] = attrs.field(factory=asyncio.Queue)

    def translate(self, event: _Event) -> dict[str, Any] | None:
        """What this watcher sees of a change (a selector turns MODIFIED into ADDED/DELETED)."""
        if self.namespace is not None and _meta(event.obj).get("namespace") != self.namespace:
            return None
        now = self.matches(event.obj)
        before = event.old is not None and self.matches(event.old)
        if event.type == "DELETED":
            kind = "DELETED" if now or before else None
        elif event.type == "ADDED":
            kind = "ADDED" if now else None
        else:
            kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get(
                (before, now)
            )
        return {"type": kind, "object": event.obj} if kind else None


# -- small pure helpers -----------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: ``null`` deletes a key, lists and scalars are replaced.

    Returns a new structure; unchanged subtrees of ``target`` are shared, never mutated.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    """A field as a field selector compares it: a string ("" if absent, "true"/"false")."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside ``(...)`` (for ``k in (a,b)``)."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


_SET_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)$")
_EQ_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")
_EXISTS_TERM = re.compile(r"^(?P<neg>!?)\s*(?P<key>[^\s!=(),]+)$")


def parse_label_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """``a=b,c!=d,e,!f,g in (h,i),j notin (k)`` -> a predicate on objects; ValueError if bad."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_selector(text):
        if m := _SET_TERM.match(term):
            key, values = m["key"], {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["op"] == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := _EQ_TERM.match(term):
            key, value = m["key"], m["value"]
            if m["op"] == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := _EXISTS_TERM.match(term):
            key, negated = m["key"], bool(m["neg"])
            checks.append(lambda labels, k=key, n=negated: (k in labels) != n)
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = _meta(obj).get("labels") or {}
        return all(check(labels) for check in checks)

    return matches


def parse_field_selector(text: str, allowed: Iterable[str]) -> Callable[[Mapping[str, Any]], bool]:
    """``metadata.name=x,status.phase!=Running`` -> a predicate; ValueError if bad/unsupported."""
    allowed = set(allowed)
    checks: list[tuple[str, bool, str]] = []
    for term in _split_selector(text):
        m = re.match(r"^(?P<key>[^=!]+?)\s*(?P<op>==|=|!=)\s*(?P<value>.*)$", term)
        if not m:
            raise ValueError(f"invalid selector: {term!r}; can't understand {term!r}")
        if m["key"] not in allowed:
            raise ValueError(f"field label not supported: {m['key']}")
        checks.append((m["key"], m["op"] == "!=", m["value"]))

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((_field_value(obj, key) == value) != negated for key, negated, value in checks)

    return matches


def _label_errors(mapping: Any, field: str, *, check_values: bool) -> list[SchemaError]:
    """Keys must be qualified names, label values <= 63 chars of ``[-A-Za-z0-9_.]``."""
    errors = []
    for key, value in mapping.items():
        prefix, _, name = key.rpartition("/")
        if not name or len(name) > 63 or not _LABEL_PART.match(name):
            detail = f"Invalid value: {json.dumps(key)}: name part must consist of alphanumeric"
            detail += " characters, '-', '_' or '.', at most 63 characters"
            errors.append(SchemaError(("metadata", field), detail, "FieldValueInvalid"))
        elif prefix and not is_dns1123_subdomain(prefix):
            detail = f"Invalid value: {json.dumps(key)}: prefix part must be a DNS-1123 subdomain"
            errors.append(SchemaError(("metadata", field), detail, "FieldValueInvalid"))
        if check_values and (len(value) > 63 or not _LABEL_PART.match(value)):
            detail = f"Invalid value: {json.dumps(value)}: a valid label must be an empty string or"
            detail += " consist of alphanumeric characters, '-', '_' or '.', at most 63 characters"
            errors.append(SchemaError(("metadata", field), detail, "FieldValueInvalid"))
    return errors


# -- errors as kube-apiserver reports them -----------------------------------------------------


def _error(code: int, reason: str, message: str, details: Any = None) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def _status_body(code: int, reason: str, message: str, details: Any = None) -> dict[str, Any]:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update(message=message, reason=reason, code=code)
    if details:
        body["details"] = details
    return body


def _details(rtype: ResourceType, name: str | None, **extra: Any) -> dict[str, Any]:
    return {"name": name or "", "group": rtype.group, "kind": rtype.plural, **extra}


def _not_found(rtype: ResourceType, name: str) -> kmock.KubernetesError:
    message = f'{rtype.group_resource} "{name}" not found'
    return _error(404, "NotFound", message, _details(rtype, name))


def _no_such_route() -> kmock.KubernetesError:
    return _error(404, "NotFound", "the server could not find the requested resource")


def _already_exists(rtype: ResourceType, name: str) -> kmock.KubernetesError:
    message = f'{rtype.group_resource} "{name}" already exists'
    return _error(409, "AlreadyExists", message, _details(rtype, name))


def _conflict(rtype: ResourceType, name: str, why: str = "") -> kmock.KubernetesError:
    why = why or (
        "the object has been modified; please apply your changes to the latest version"
        " and try again"
    )
    message = f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": {why}'
    return _error(409, "Conflict", message, _details(rtype, name))


def _invalid(
    rtype: ResourceType, name: str, errors: Sequence[SchemaError]
) -> kmock.KubernetesError:
    listed = [str(e) for e in errors]
    summary = listed[0] if len(listed) == 1 else f"[{', '.join(listed)}]"
    causes = [{"reason": e.reason, "message": e.detail, "field": e.field} for e in errors]
    details = {"name": name, "group": rtype.group, "kind": rtype.kind, "causes": causes}
    return _error(422, "Invalid", f'{rtype.qualified_kind} "{name}" is invalid: {summary}', details)


def _bad_request(message: str) -> kmock.KubernetesError:
    return _error(400, "BadRequest", message)


def _method_not_allowed() -> kmock.KubernetesError:
    message = "the server does not allow this method on the requested resource"
    return _error(405, "MethodNotAllowed", message)


# -- the emulator ------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """A stateful Kubernetes API server in memory (see the module docstring for the scope).

    Register what it serves with :meth:`register_crd` / :meth:`register_builtin` (or
    :meth:`register_core_resources`), serve it with ``kmock.Server(kube)``, point clients at it
    with :meth:`write_kubeconfig`. State changes happen under one asyncio lock, in the event loop
    of the server; the test helpers (``get_object``, ``apply_object``, ...) run in that loop too.
    """

    field_validation: str = "Strict"  # the default for requests without ?fieldValidation=
    event_log_size: int = 10000  # watch events retained per resource; older rv -> 410 Expired
    server_version: str = "v1.33.0"
    # Injected failures of the operator's requests (tests/kube/faults.py); None: none.
    faults: Faults | None = None

    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str, str], dict[tuple[str | None, str], dict[str, Any]]] = attrs.field(
        factory=lambda: collections.defaultdict(dict), init=False
    )
    _log: dict[tuple[str, str, str], collections.deque[_Event]] = attrs.field(
        factory=dict, init=False
    )
    _compacted: dict[tuple[str, str, str], int] = attrs.field(
        factory=lambda: collections.defaultdict(int), init=False
    )
    _watchers: dict[tuple[str, str, str], set[_Watcher]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False
    )
    _uids: dict[str, tuple[tuple[str, str, str], str | None, str]] = attrs.field(
        factory=dict, init=False
    )
    _rv: int = attrs.field(default=0, init=False)
    _pod_logs: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)
    api_calls: list[ApiCall] = attrs.field(factory=list, init=False)
    # Objects created, by (group/plural, namespace, name): a count above 1 is a re-creation.
    created: collections.Counter[tuple[str, str | None, str]] = attrs.field(
        factory=collections.Counter, init=False
    )

    def __attrs_post_init__(self) -> None:
        # Deliberately no super(): the parent registers fallback reactions that keep their own
        # (simplistic) state; here, _handle() serves everything that tests did not override.
        pass

    async def __aexit__(self, *exc_info: Any) -> None:
        self.stop_watches()
        await super().__aexit__(*exc_info)

    # -- registration ----------------------------------------------------------------------

    def register_crd(self, crd: CrdSchema | str | Path) -> ResourceType:
        """Serve a custom resource (its storage version), validated against its schema."""
        schema = crd if isinstance(crd, CrdSchema) else CrdSchema.from_file(crd)
        return self._register(
            ResourceType(
                group=schema.group,
                version=schema.version,
                plural=schema.plural,
                kind=schema.kind,
                namespaced=schema.namespaced,
                singular=schema.singular,
                short_names=schema.short_names,
                categories=schema.categories,
                subresources=("status",) if schema.status_subresource else (),
                selectable_fields=schema.selectable_fields,
                schema=schema,
            )
        )

    def register_builtin(
        self,
        api_version: str,
        plural: str,
        kind: str,
        namespaced: bool = True,
        *,
        short_names: Iterable[str] = (),
        subresources: Iterable[str] = (),
        selectable_fields: Iterable[str] | None = None,
    ) -> ResourceType:
        """Serve a built-in resource, unvalidated: ``register_builtin("v1", "pods", "Pod")``."""
        group, _, version = api_version.rpartition("/")
        if selectable_fields is None:
            selectable_fields = BUILTIN_SELECTABLE_FIELDS.get((group, plural), ())
        return self._register(
            ResourceType(
                group=group,
                version=version,
                plural=plural,
                kind=kind,
                namespaced=namespaced,
                singular=kind.lower(),
                short_names=tuple(short_names),
                subresources=tuple(subresources),
                selectable_fields=tuple(selectable_fields),
            )
        )

    def register_core_resources(self) -> None:
        """ConfigMaps, Events, Pods (+status, log), Namespaces, Secrets, Services."""
        self.register_builtin("v1", "configmaps", "ConfigMap", short_names=["cm"])
        self.register_builtin("v1", "events", "Event", short_names=["ev"])
        self.register_builtin(
            "v1", "pods", "Pod", short_names=["po"], subresources=["status", "log"]
        )
        self.register_builtin(
            "v1",
            "namespaces",
            "Namespace",
            namespaced=False,
            short_names=["ns"],
            subresources=["status"],
        )
        self.register_builtin("v1", "secrets", "Secret")
        self.register_builtin(
            "v1", "services", "Service", short_names=["svc"], subresources=["status"]
        )

    def _register(self, rtype: ResourceType) -> ResourceType:
        self._types[rtype.key] = rtype
        self._log.setdefault(rtype.key, collections.deque(maxlen=self.event_log_size))
        self.resources[kmock.resource(*rtype.key)] = kmock.ResourceInfo(
            namespaced=rtype.namespaced,
            kind=rtype.kind,
            singular=rtype.singular,
            verbs=_VERBS,
            shortnames=rtype.short_names,
            categories=rtype.categories,
            subresources=rtype.subresources,
        )
        return rtype

    def write_kubeconfig(
        self, path: str | Path, server: kmock.Server | None = None, namespace: str = "default"
    ) -> Path:
        """A kubeconfig for plain http to the server, without credentials; returns its path."""
        server = server if server is not None else self.servers[0]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "emulator", "cluster": {"server": f"http://{server.host}:{server.port}"}}
            ],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- test helpers ----------------------------------------------------------------------

    def get_object(self, resource: ResourceRef, namespace: str | None, name: str) -> dict | None:
        """A copy of the stored object, or None."""
        rtype = self._resolve(resource)
        obj = self._store[rtype.key].get((self._scope(rtype, namespace), name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, resource: ResourceRef, namespace: str | None = None) -> list[dict]:
        """Copies of the stored objects, of one namespace or of all, sorted by namespace/name."""
        rtype = self._resolve(resource)
        return [copy.deepcopy(obj) for obj in self._select(rtype, namespace, lambda _: True)]

    async def apply_object(self, obj: Mapping[str, Any]) -> dict:
        """Create or replace an object, status included (what a test or a controller sets up)."""
        rtype = self._type_of(obj)
        namespace = self._scope(rtype, _meta(obj).get("namespace") or "default")
        async with self._lock:
            current = self._store[rtype.key].get((namespace, _meta(obj).get("name")))
            if current is None:
                result, _ = self._create(rtype, namespace, obj, part="all")
            else:
                replacement = copy.deepcopy(dict(obj))
                result, _ = self._update(rtype, current, lambda _: replacement, part="all")
        return copy.deepcopy(result)

    async def patch_status(
        self, resource: ResourceRef, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> dict:
        """Merge-patch ``status`` as a controller would (e.g. KubeRay on a RayJob): MODIFIED."""
        rtype = self._resolve(resource)
        patch = {"status": copy.deepcopy(dict(status))}
        async with self._lock:
            current = self._get_or_404(rtype, self._scope(rtype, namespace), name)
            result, _ = self._update(
                rtype, current, lambda cur: merge_patch(cur, patch), part="all"
            )
        return copy.deepcopy(result)

    async def delete_object(
        self,
        resource: ResourceRef,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
    ) -> dict:
        """Delete as the API does (finalizers and garbage collection included)."""
        rtype = self._resolve(resource)
        async with self._lock:
            current = self._get_or_404(rtype, self._scope(rtype, namespace), name)
            result = self._delete(rtype, current, {"propagationPolicy": propagation})
        return copy.deepcopy(result)

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        """What ``GET /api/v1/namespaces/NS/pods/NAME/log`` returns (the pod must exist)."""
        self._pod_logs[namespace, name] = text

    async def wait_for_object(
        self,
        resource: ResourceRef,
        namespace: str | None,
        name: str,
        condition: Callable[[dict], Any] = bool,
        timeout: float = 10.0,
    ) -> dict:
        """Poll until the object exists and ``condition(obj)`` is truthy; TimeoutError if not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            obj = self.get_object(resource, namespace, name)
            if obj is not None and condition(obj):
                return obj
            if asyncio.get_running_loop().time() > deadline:
                raise asyncio.TimeoutError(f"{resource} {namespace}/{name}: {obj!r}")
            await asyncio.sleep(0.02)

    def stop_watches(self) -> None:
        """End every open watch stream (before the server stops: it waits for open requests)."""
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)

    # -- HTTP entry point --------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Parse, log and serve one request (replaces kmock's parsing, which cannot handle
        ``/api/v1/namespaces``); API errors become Status bodies; bugs become 500s and are
        collected in ``kube.errors`` as kmock does."""
        request = await self._parse_request(raw_request)
        self._requests.append(request)
        try:
            return await self._handle(request)
        except kmock.KubernetesError as e:
            return await self._render_error(e)
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)
            return await self._render_error(e)

    async def _parse_request(self, raw_request: aiohttp.web.BaseRequest) -> kmock.Request:
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        route = _parse_path(raw_request.path)
        verb = self._verb(raw_request.method, route, raw_request.query)
        resource = None
        if route.group is not None:
            resource = kmock.resource(group=route.group, version=route.version, plural=route.plural)
        return kmock.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            body=body,
            text=body.decode("utf-8", errors="replace"),
            data=data,
            action=kmock.action(_KMOCK_ACTIONS[verb]) if verb in _KMOCK_ACTIONS else None,
            resource=resource,
            namespace=route.namespace,
            name=route.name,
            subresource=route.subresource,
        )

    @staticmethod
    def _verb(method: str, route: _Route, query: Mapping[str, str]) -> str | None:
        """The RBAC verb of a resource request (None for discovery and other paths)."""
        if not route.is_resource:
            return None
        match method.upper():
            case "GET":
                return "watch" if _truthy(query.get("watch")) else "get" if route.name else "list"
            case "POST":
                return "create"
            case "PUT":
                return "update"
            case "PATCH":
                return "patch"
            case "DELETE":
                return "delete" if route.name else "deletecollection"
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Reactions that a test added win; everything else is emulated.

        Replaces the parent's ``_handle``, which stores request bodies verbatim.
        """
        if self._payloads:
            with contextlib.suppress(NotImplementedError):  # no reaction matched
                return await kmock.RawHandler._handle(self, request)
        route = _parse_path(request.url.path)
        if route.is_resource:
            return await self._serve_resource(request, route)
        return await self._serve_discovery(request, route)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            body = _status_body(exc.status, exc.reason or "", exc.message or "", exc.details)
        else:
            body = _status_body(500, "InternalError", f"emulator bug: {exc!r}")
        return aiohttp.web.json_response(body, status=body["code"])

    # -- discovery ---------------------------------------------------------------------------

    async def _serve_discovery(
        self, request: kmock.Request, route: _Route
    ) -> aiohttp.web.StreamResponse:
        """``/version``, ``/api``, ``/apis``, ``/apis/G``, ``/apis/G/V``, ``/api/v1``, ``/``."""
        if request.method.upper() != "GET":
            raise _method_not_allowed() if route.parts else _no_such_route()
        parts = route.parts
        if parts in (("healthz",), ("livez",), ("readyz",)):
            return aiohttp.web.Response(text="ok")
        if parts == ("version",):
            body: dict[str, Any] = self._version_info()
        elif parts == ():
            body = {"paths": self._paths()}
        elif parts == ("api",):
            body = {"kind": "APIVersions", "versions": ["v1"]}
        elif parts == ("apis",):
            body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": self._groups()}
        elif len(parts) == 2 and parts[0] == "apis":
            body = next((g for g in self._groups() if g["name"] == parts[1]), None)
            if body is None:
                raise _no_such_route()
            body = {"kind": "APIGroup", "apiVersion": "v1", **body}
        elif route.group is not None:
            body = self._resource_list(route.group, route.version or "")
        else:
            raise _no_such_route()
        return aiohttp.web.json_response(body)

    def _version_info(self) -> dict[str, str]:
        major, minor, *_ = self.server_version.lstrip("v").split(".")
        return {
            "major": major,
            "minor": minor,
            "gitVersion": self.server_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _paths(self) -> list[str]:
        paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/livez", "/readyz"}
        for group, version, _ in self._types:
            if group:
                paths |= {f"/apis/{group}", f"/apis/{group}/{version}"}
        return sorted(paths)

    def _groups(self) -> list[dict[str, Any]]:
        versions: dict[str, list[str]] = {}
        for group, version, _ in self._types:
            if group and version not in versions.setdefault(group, []):
                versions[group].append(version)
        return [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in names],
                "preferredVersion": {"groupVersion": f"{group}/{names[0]}", "version": names[0]},
            }
            for group, names in versions.items()
        ]

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        rtypes = [t for t in self._types.values() if (t.group, t.version) == (group, version)]
        if not rtypes and group:
            raise _no_such_route()
        resources = []
        for rtype in rtypes:
            entry: dict[str, Any] = {
                "name": rtype.plural,
                "singularName": rtype.singular,
                "namespaced": rtype.namespaced,
                "kind": rtype.kind,
                "verbs": _VERBS,
            }
            if rtype.short_names:
                entry["shortNames"] = list(rtype.short_names)
            if rtype.categories:
                entry["categories"] = list(rtype.categories)
            resources.append(entry)
            for sub in rtype.subresources:
                resources.append(
                    {
                        "name": f"{rtype.plural}/{sub}",
                        "singularName": "",
                        "namespaced": rtype.namespaced,
                        "kind": rtype.kind,
                        "verbs": _SUBRESOURCE_VERBS.get(sub, ["get"]),
                    }
                )
        group_version = f"{group}/{version}" if group else version
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    # -- resource requests: routing ----------------------------------------------------------

    async def _serve_resource(
        self, request: kmock.Request, route: _Route
    ) -> aiohttp.web.StreamResponse:
        """Route a resource request by its RBAC verb (and record it in ``api_calls``)."""
        verb = self._verb(request.method, route, request.params)
        assert route.group is not None and route.version is not None and route.plural is not None
        if verb is not None:
            call = ApiCall(verb, route.group, route.plural, route.subresource, route.namespace)
            self.api_calls.append(call)
        fault = None
        if self.faults is not None and verb not in (None, "watch"):
            fault = self.faults.draw(verb)
        if fault is None:
            return await self._route_resource(request, route, verb)
        if fault.after:  # it takes effect; only the answer is lost
            with contextlib.suppress(kmock.KubernetesError):
                await self._route_resource(request, route, verb)
        reason, message = REASONS[fault.code]
        headers = {"Retry-After": "1"} if fault.code == 429 else None
        body = _status_body(fault.code, reason, message)
        return aiohttp.web.json_response(body, status=fault.code, headers=headers)

    async def _route_resource(
        self, request: kmock.Request, route: _Route, verb: str | None
    ) -> aiohttp.web.StreamResponse:
        assert route.group is not None and route.version is not None and route.plural is not None
        rtype = self._types.get((route.group, route.version, route.plural))
        if rtype is None or (route.namespace is not None and not rtype.namespaced):
            raise _no_such_route()
        if rtype.namespaced and route.namespace is None and (route.name or verb == "create"):
            raise _no_such_route() if route.name else _method_not_allowed()
        if route.subresource is not None:
            return await self._serve_subresource(request, rtype, route, verb)

        match verb:
            case "watch":
                return await self._serve_watch(request, rtype, route)
            case "list":
                async with self._lock:
                    body = self._list_body(rtype, route.namespace, self._selector(rtype, request))
            case "get":
                async with self._lock:
                    body = self._get_or_404(rtype, route.namespace, route.name or "")
            case "create" if route.name is None:
                return await self._serve_create(request, rtype, route)
            case "update" | "patch":
                return await self._serve_update(request, rtype, route, verb, part="main")
            case "delete":
                async with self._lock:
                    current = self._get_or_404(rtype, route.namespace, route.name or "")
                    body = self._delete(rtype, current, self._delete_options(request))
            case "deletecollection":
                async with self._lock:
                    selected = self._select(rtype, route.namespace, self._selector(rtype, request))
                    options = self._delete_options(request)
                    items = [
                        self._delete(rtype, obj, options) for obj in self._fresh(rtype, selected)
                    ]
                body = {
                    "apiVersion": rtype.api_version,
                    "kind": f"{rtype.kind}List",
                    "items": items,
                }
                body["metadata"] = {"resourceVersion": str(self._rv)}
            case _:
                raise _method_not_allowed()
        return aiohttp.web.json_response(body)

    async def _serve_subresource(
        self, request: kmock.Request, rtype: ResourceType, route: _Route, verb: str | None
    ) -> aiohttp.web.StreamResponse:
        """``/status`` (get, patch, update) and ``pods/NAME/log`` (get)."""
        if route.subresource not in rtype.subresources:
            raise _no_such_route()
        if verb not in _SUBRESOURCE_VERBS.get(route.subresource, []):
            raise _method_not_allowed()
        if route.subresource == "log":
            return await self._serve_log(request, rtype, route)
        if verb == "get":
            async with self._lock:
                body = self._get_or_404(rtype, route.namespace, route.name or "")
            return aiohttp.web.json_response(body)
        return await self._serve_update(request, rtype, route, verb, part="status")

    async def _serve_log(
        self, request: kmock.Request, rtype: ResourceType, route: _Route
    ) -> aiohttp.web.StreamResponse:
        """The text given by :meth:`set_pod_log`; ``tailLines`` honoured, ``follow`` ignored."""
        namespace, name = route.namespace or "", route.name or ""
        self._get_or_404(rtype, namespace, name)
        lines = self._pod_logs.get((namespace, name), "").splitlines(keepends=True)
        if "tailLines" in request.params:
            try:
                tail = int(request.params["tailLines"])
            except ValueError:
                raise _bad_request("tailLines must be an integer") from None
            lines = lines[-tail:] if tail > 0 else []
        return aiohttp.web.Response(text="".join(lines), content_type="text/plain")

    async def _serve_create(
        self, request: kmock.Request, rtype: ResourceType, route: _Route
    ) -> aiohttp.web.StreamResponse:
        body = self._json_body(request, dict)
        async with self._lock:
            obj, warnings = self._create(
                rtype, route.namespace, body, field_validation=self._field_validation(request)
            )
        return aiohttp.web.json_response(obj, status=201, headers=self._warning_headers(warnings))

    async def _serve_update(
        self, request: kmock.Request, rtype: ResourceType, route: _Route, verb: str, part: Part
    ) -> aiohttp.web.StreamResponse:
        """PATCH (merge, JSON, strategic-as-merge) and PUT, on the main resource or ``/status``."""
        name = route.name or ""
        if verb == "update":
            body = self._json_body(request, dict)
            if _meta(body).get("name", name) != name:
                raise _bad_request(
                    f"the name of the object ({_meta(body).get('name')}) does not match"
                    f" the name on the URL ({name})"
                )
            compute = self._replacer(rtype, name, body)
        else:
            compute = self._patcher(rtype, name, request)
        async with self._lock:
            current = self._get_or_404(rtype, route.namespace, name)
            obj, warnings = self._update(
                rtype, current, compute, part=part, field_validation=self._field_validation(request)
            )
        return aiohttp.web.json_response(obj, headers=self._warning_headers(warnings))

    def _replacer(
        self, rtype: ResourceType, name: str, body: dict[str, Any]
    ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """PUT: the body replaces the object if its resourceVersion (when given) is current."""

        def replace(current: dict[str, Any]) -> dict[str, Any]:
            expected = _meta(body).get("resourceVersion")
            if expected and expected != _meta(current).get("resourceVersion"):
                raise _conflict(rtype, name)
            return body

        return replace

    def _patcher(
        self, rtype: ResourceType, name: str, request: kmock.Request
    ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """PATCH by content type; a resourceVersion in a merge patch is a precondition."""
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            patch = self._json_body(request, dict)

            def apply_merge(current: dict[str, Any]) -> dict[str, Any]:
                expected = _meta(patch).get("resourceVersion")
                if expected and expected != _meta(current).get("resourceVersion"):
                    raise _conflict(rtype, name)
                return merge_patch(current, patch)

            return apply_merge
        if content_type == "application/json-patch+json":
            operations = self._json_body(request, list)

            def apply_json(current: dict[str, Any]) -> dict[str, Any]:
                try:
                    result = jsonpatch.JsonPatch(operations).apply(current, in_place=False)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    raise _error(422, "Invalid", f"the server rejected our request: {e}") from None
                if not isinstance(result, dict):
                    raise _error(422, "Invalid", "the patched document is not an object")
                return result

            return apply_json
        raise _error(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format ({content_type or 'none'}) -"
            " accepted media types include: application/json-patch+json,"
            " application/merge-patch+json, application/strategic-merge-patch+json"
            " (server-side apply is not emulated)",
        )

    @staticmethod
    def _json_body(request: kmock.Request, kind: type[T]) -> T:
        try:
            data = json.loads(request.body)
        except ValueError as e:
            raise _bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, kind):
            shape = {"dict": "object", "list": "array"}.get(kind.__name__, kind.__name__)
            raise _bad_request(f"the request body must be a JSON {shape}")
        return data

    @staticmethod
    def _field_validation(request: kmock.Request) -> str | None:
        value = request.params.get("fieldValidation")
        if value is not None and value not in ("Ignore", "Warn", "Strict"):
            raise _bad_request(f"fieldValidation must be Ignore, Warn or Strict, not {value!r}")
        return value

    @staticmethod
    def _warning_headers(warnings: Sequence[str]) -> dict[str, str] | None:
        if not warnings:
            return None
        return {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)}

    @staticmethod
    def _delete_options(request: kmock.Request) -> dict[str, Any]:
        """DeleteOptions from the body (kr8s, kubectl) and/or the query string."""
        options = request.data if isinstance(request.data, dict) else {}
        if "propagationPolicy" in request.params:
            options = {**options, "propagationPolicy": request.params["propagationPolicy"]}
        return options

    def _selector(self, rtype: ResourceType, request: kmock.Request) -> Callable[[Mapping], bool]:
        """labelSelector AND fieldSelector (400 BadRequest if unparsable or unsupported)."""
        checks = []
        try:
            if request.params.get("labelSelector"):
                checks.append(parse_label_selector(request.params["labelSelector"]))
            if request.params.get("fieldSelector"):
                allowed = ("metadata.name", "metadata.namespace", *rtype.selectable_fields)
                checks.append(parse_field_selector(request.params["fieldSelector"], allowed))
        except ValueError as e:
            raise _bad_request(str(e)) from None
        return lambda obj: all(check(obj) for check in checks)

    # -- watch -------------------------------------------------------------------------------

    async def _serve_watch(
        self, request: kmock.Request, rtype: ResourceType, route: _Route
    ) -> aiohttp.web.StreamResponse:
        """Stream events as JSON lines: a replay (or synthetic ADDED), then live events.

        The replay is taken and the watcher is registered under the lock, so nothing written
        in between is lost; a resourceVersion older than the retained log gets 410 Expired.
        """
        params = request.params
        selector = self._selector(rtype, request)
        if route.name is not None:  # the deprecated per-object watch URL
            name, inner = route.name, selector
            selector = lambda obj: _meta(obj).get("name") == name and inner(obj)  # noqa: E731
        since = params.get("resourceVersion") or "0"
        timeout = self._timeout_seconds(params)
        initial_end = _truthy(params.get("sendInitialEvents")) and since == "0"
        watcher = _Watcher(route.namespace, selector)

        async with self._lock:
            expired, replay = self._watch_start(rtype, watcher, since)
            snapshot_rv = self._rv
            if not expired:
                self._watchers[rtype.key].add(watcher)

        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        assert request._raw_request is not None
        try:
            await response.prepare(request._raw_request)
            if expired is not None:
                await self._send(response, {"type": "ERROR", "object": expired})
                return response
            for event in replay:
                await self._send(response, event)
            if initial_end:
                await self._send(response, self._initial_end_bookmark(rtype, snapshot_rv))
            lifetime = self.faults.watch_lifetime() if self.faults is not None else None
            cut = await self._stream_live(response, watcher, timeout, lifetime)
        except ConnectionError:
            return response  # the client went away (before or while streaming)
        finally:
            self._watchers[rtype.key].discard(watcher)
        if cut:  # an injected drop: the connection goes, with no end of stream
            assert self.faults is not None and request._raw_request.transport is not None
            self.faults.count_drop()
            request._raw_request.transport.close()
            return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    @staticmethod
    def _timeout_seconds(params: Mapping[str, str]) -> float | None:
        if "timeoutSeconds" not in params:
            return None
        try:
            return max(0.0, float(params["timeoutSeconds"]))
        except ValueError:
            raise _bad_request("timeoutSeconds must be a number") from None

    def _watch_start(
        self, rtype: ResourceType, watcher: _Watcher, since: str
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(a 410 Status if too old, the events to replay); call under the lock."""
        if since == "0":
            objects = self._select(rtype, watcher.namespace, watcher.matches)
            return None, [{"type": "ADDED", "object": obj} for obj in objects]
        try:
            since_rv = int(since)
        except ValueError:
            raise _bad_request(f"invalid resourceVersion: {since!r}") from None
        if since_rv < self._compacted[rtype.key]:
            message = f"too old resource version: {since_rv} ({self._compacted[rtype.key] + 1})"
            return _status_body(410, "Expired", message), []
        events = (watcher.translate(e) for e in self._log[rtype.key] if e.rv > since_rv)
        return None, [event for event in events if event is not None]

    @staticmethod
    def _initial_end_bookmark(rtype: ResourceType, rv: int) -> dict[str, Any]:
        metadata = {
            "resourceVersion": str(rv),
            "annotations": {"k8s.io/initial-events-end": "true"},
        }
        obj = {"apiVersion": rtype.api_version, "kind": rtype.kind, "metadata": metadata}
        return {"type": "BOOKMARK", "object": obj}

    async def _stream_live(
        self,
        response: aiohttp.web.StreamResponse,
        watcher: _Watcher,
        timeout: float | None,
        lifetime: float | None = None,
    ) -> bool:
        """Send queued events until timeoutSeconds passes, :meth:`stop_watches` is called, or
        the kmock.Server stops (it would wait for open streams of clients that outlive it);
        True when an injected `lifetime` ran out first (the caller cuts the connection)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        cut_at = None if lifetime is None else loop.time() + lifetime
        served = bool(self.servers)
        while not (served and not self.servers):
            if cut_at is not None and loop.time() >= cut_at:
                return True
            remaining = _WATCH_POLL if deadline is None else deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                event = await asyncio.wait_for(watcher.queue.get(), min(remaining, _WATCH_POLL))
            except asyncio.TimeoutError:
                continue
            if event is None:
                return False
            await self._send(response, event)
        return False

    @staticmethod
    async def _send(response: aiohttp.web.StreamResponse, event: Mapping[str, Any]) -> None:
        await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    # -- state: reads (call under the lock) ----------------------------------------------------

    def _get_or_404(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._store[rtype.key].get((namespace, name))
        if obj is None:
            raise _not_found(rtype, name)
        return obj

    def _select(
        self, rtype: ResourceType, namespace: str | None, matches: Callable[[Mapping], bool]
    ) -> list[dict[str, Any]]:
        """Objects of one namespace (or all), in etcd key order, that match the selectors."""
        store = self._store[rtype.key]
        keys = sorted(k for k in store if namespace is None or k[0] == namespace)
        return [store[k] for k in keys if matches(store[k])]

    def _list_body(
        self, rtype: ResourceType, namespace: str | None, matches: Callable[[Mapping], bool]
    ) -> dict[str, Any]:
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": self._select(rtype, namespace, matches),
        }

    # -- state: writes (call under the lock; no awaits inside) ----------------------------------

    def _create(
        self,
        rtype: ResourceType,
        namespace: str | None,
        body: Mapping[str, Any],
        *,
        part: Part = "main",
        field_validation: str | None = None,
    ) -> tuple[dict[str, Any], list[str]]:
        """POST: name/generateName, server metadata, status dropped (subresource), validation."""
        obj = copy.deepcopy(dict(body))
        self._check_type_meta(rtype, obj)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        body_namespace = meta.get("namespace")
        if rtype.namespaced and body_namespace and body_namespace != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent"
                " on the request"
            )
        meta = {key: value for key, value in meta.items() if key not in _SERVER_METADATA}
        if rtype.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(rtype, namespace, str(meta["generateName"]))
        name = meta.get("name")
        if not name:
            error = SchemaError(
                ("metadata", "name"),
                "Required value: name or generateName is required",
                "FieldValueRequired",
            )
            raise _invalid(rtype, "", [error])
        if rtype.has_status and part == "main":
            obj.pop("status", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        head = {"apiVersion": obj.pop("apiVersion"), "kind": obj.pop("kind"), "metadata": meta}
        obj = {**head, **{key: value for key, value in obj.items() if key != "metadata"}}
        obj, warnings = self._validated(rtype, obj, field_validation)
        if (namespace, name) in self._store[rtype.key]:
            raise _already_exists(rtype, name)
        self._commit(rtype, "ADDED", obj, old=None)
        self.created[(rtype.group_resource, namespace, name)] += 1
        return obj, warnings

    def _update(
        self,
        rtype: ResourceType,
        current: dict[str, Any],
        compute: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        part: Part,
        field_validation: str | None = None,
    ) -> tuple[dict[str, Any], list[str]]:
        """PATCH/PUT: ``compute`` makes the candidate from the current object; the server
        keeps what the client may not change, bumps generation on spec changes, ignores
        no-op writes, and completes a pending deletion once the finalizers are gone."""
        candidate = compute(current)
        new = self._merge_update(rtype, current, candidate, part)
        new, warnings = self._validated(rtype, new, field_validation)
        if new == current:
            return current, warnings
        if self._spec_of(rtype, new) != self._spec_of(rtype, current):
            new["metadata"]["generation"] = int(_meta(current).get("generation") or 0) + 1
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(rtype, new, old=current), warnings
        self._commit(rtype, "MODIFIED", new, old=current)
        return new, warnings

    def _merge_update(
        self, rtype: ResourceType, current: dict[str, Any], candidate: Any, part: Part
    ) -> dict[str, Any]:
        """What an update may change: only ``status`` via /status; never server metadata."""
        if not isinstance(candidate, dict):
            raise _bad_request("the object must be a JSON object")
        if part == "status":
            new = dict(current)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
            new["metadata"] = dict(current["metadata"])
            return new

        new = dict(candidate)
        self._check_type_meta(rtype, new)
        old_meta = current["metadata"]
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        meta = dict(meta)
        name = old_meta["name"]
        if meta.get("name", name) != name:
            raise _bad_request(f"the name of the object ({meta.get('name')}) cannot be changed")
        if (
            rtype.namespaced
            and meta.get("namespace", old_meta["namespace"]) != old_meta["namespace"]
        ):
            raise _bad_request("the namespace of the object cannot be changed")
        if meta.get("uid") and meta["uid"] != old_meta.get("uid"):
            why = (
                f"Precondition failed: UID in precondition: {meta['uid']},"
                f" UID in object meta: {old_meta.get('uid')}"
            )
            raise _conflict(rtype, name, why)
        for key in ("name", "namespace", *_SERVER_METADATA):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or ()) - set(old_meta.get("finalizers") or ())
            if added:
                detail = "Forbidden: no new finalizers can be added if the object is being deleted"
                raise _invalid(
                    rtype,
                    name,
                    [SchemaError(("metadata", "finalizers"), detail, "FieldValueForbidden")],
                )
        new["metadata"] = meta
        if rtype.has_status and part == "main":
            if "status" in current:
                new["status"] = current["status"]
            else:
                new.pop("status", None)
        return new

    def _delete(
        self, rtype: ResourceType, current: dict[str, Any], options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """DELETE: with finalizers, mark (deletionTimestamp, MODIFIED); else remove + GC."""
        meta = _meta(current)
        preconditions = options.get("preconditions") or {}
        for key in ("uid", "resourceVersion"):
            if preconditions.get(key) and preconditions[key] != meta.get(key):
                why = (
                    f"Precondition failed: {key} in precondition: {preconditions[key]},"
                    f" {key} in object meta: {meta.get(key)}"
                )
                raise _conflict(rtype, meta.get("name", ""), why)
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return current
            new = {**current, "metadata": dict(meta)}
            new["metadata"].update(
                deletionTimestamp=_now(),
                deletionGracePeriodSeconds=0,
                generation=int(meta.get("generation") or 0) + 1,
            )
            self._commit(rtype, "MODIFIED", new, old=current)
            return new
        cascade = options.get("propagationPolicy") != "Orphan"
        return self._remove(rtype, current, old=current, cascade=cascade)

    def _remove(
        self,
        rtype: ResourceType,
        final: dict[str, Any],
        *,
        old: dict[str, Any],
        cascade: bool = True,
    ) -> dict[str, Any]:
        """Drop the object (DELETED, with a new resourceVersion), then collect its dependents."""
        final = {**final, "metadata": dict(final["metadata"])}
        self._commit(rtype, "DELETED", final, old=old)
        if cascade:
            self._collect_garbage(final["metadata"].get("uid"))
        return final

    def _collect_garbage(self, owner_uid: str | None) -> None:
        """Delete the dependents of a removed owner once none of their owners exist."""
        if not owner_uid:
            return
        for key, store in list(self._store.items()):
            rtype = self._types[key]
            dependents = []
            for obj in store.values():
                owners = {ref.get("uid") for ref in _meta(obj).get("ownerReferences") or ()}
                if owner_uid in owners and not owners & self._uids.keys():
                    dependents.append(obj)
            for obj in self._fresh(rtype, dependents):
                self._delete(rtype, obj, {})

    def _fresh(self, rtype: ResourceType, objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The current state of each object, skipping those removed meanwhile (by GC)."""
        for obj in objs:
            current = self._store[rtype.key].get((_meta(obj).get("namespace"), _meta(obj)["name"]))
            if current is not None:
                yield current

    def _commit(
        self, rtype: ResourceType, kind: str, obj: dict[str, Any], *, old: dict[str, Any] | None
    ) -> None:
        """Bump the global resourceVersion, store (or drop) the object, log and fan out."""
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = (meta.get("namespace"), meta["name"])
        if kind == "DELETED":
            self._store[rtype.key].pop(key, None)
            self._uids.pop(meta.get("uid"), None)
        else:
            self._store[rtype.key][key] = obj
            self._uids[meta["uid"]] = (rtype.key, *key)
        event = _Event(self._rv, kind, obj, old)
        log = self._log[rtype.key]
        if len(log) == log.maxlen:
            self._compacted[rtype.key] = log[0].rv
        log.append(event)
        for watcher in self._watchers[rtype.key]:
            translated = watcher.translate(event)
            if translated is not None:
                watcher.queue.put_nowait(translated)
        self._mirror(rtype, key, obj if kind != "DELETED" else None)

    def _mirror(self, rtype: ResourceType, key: tuple[str | None, str], obj: dict | None) -> None:
        """Keep kmock's ``kube.objects`` (a versioned history view) in step, for assertions."""
        mkey = (kmock.resource(*rtype.key), *key)
        if obj is None:
            self.objects[mkey].delete()
        elif mkey in self.objects:
            self.objects[mkey].create(obj)
        else:
            self.objects[mkey] = obj

    # -- state: checks ---------------------------------------------------------------------

    def _validated(
        self, rtype: ResourceType, obj: dict[str, Any], field_validation: str | None
    ) -> tuple[dict[str, Any], list[str]]:
        """Server-side normalization and validation; (the object to store, warnings)."""
        errors = self._metadata_errors(rtype, obj)
        warnings: list[str] = []
        if rtype.schema is not None:
            obj = rtype.schema.normalize(obj)
            if (field_validation or self.field_validation) in ("Ignore", "Warn"):
                obj, pruned = rtype.schema.prune_unknown(obj)
                if (field_validation or self.field_validation) == "Warn":
                    warnings = [f'unknown field "{path}"' for path in pruned]
            errors += rtype.schema.errors(obj)
        if errors:
            raise _invalid(rtype, _meta(obj).get("name") or "", errors)
        return obj, warnings

    def _metadata_errors(self, rtype: ResourceType, obj: Mapping[str, Any]) -> list[SchemaError]:
        """ObjectMeta: name, label and annotation keys/values, finalizers, ownerReferences."""
        meta = _meta(obj)
        errors: list[SchemaError] = []
        for field in ("labels", "annotations"):
            mapping = meta.get(field) or {}
            if not isinstance(mapping, dict) or not all(
                isinstance(v, str) for v in mapping.values()
            ):
                raise _bad_request(f"metadata.{field} must be a map of strings")
            errors += _label_errors(mapping, field, check_values=field == "labels")
        if not all(isinstance(f, str) for f in meta.get("finalizers") or ()):
            raise _bad_request("metadata.finalizers must be a list of strings")
        for index, ref in enumerate(meta.get("ownerReferences") or ()):
            for field in ("apiVersion", "kind", "name", "uid"):
                if not isinstance(ref, dict) or not ref.get(field):
                    path = ("metadata", "ownerReferences", index, field)
                    errors.append(SchemaError(path, "Required value", "FieldValueRequired"))
        name = meta.get("name") or ""
        valid = (
            _DNS1123_LABEL.match(name) and len(name) <= 63
            if rtype.plural == "namespaces"
            else is_dns1123_subdomain(name)
        )
        if rtype.schema is None and not valid:
            detail = f"Invalid value: {json.dumps(name)}: must be a lowercase RFC 1123 name"
            errors.append(SchemaError(("metadata", "name"), detail, "FieldValueInvalid"))
        return errors

    @staticmethod
    def _check_type_meta(rtype: ResourceType, obj: dict[str, Any]) -> None:
        """apiVersion/kind: filled in if absent, 400 if they name another resource."""
        if obj.setdefault("apiVersion", rtype.api_version) != rtype.api_version:
            raise _bad_request(
                f"the API version in the data ({obj['apiVersion']}) does not match the expected"
                f" API version ({rtype.api_version})"
            )
        if obj.setdefault("kind", rtype.kind) != rtype.kind:
            raise _bad_request(f"the kind in the data ({obj['kind']}) does not match {rtype.kind}")

    @staticmethod
    def _spec_of(rtype: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
        """What metadata.generation tracks: all but metadata (and status, with /status)."""
        skipped = {"metadata", "apiVersion", "kind"} | ({"status"} if rtype.has_status else set())
        return {key: value for key, value in obj.items() if key not in skipped}

    def _generate_name(self, rtype: ResourceType, namespace: str | None, prefix: str) -> str:
        while True:
            name = prefix + "".join(random.choices(_NAME_SUFFIX_CHARS, k=5))
            if (namespace, name) not in self._store[rtype.key]:
                return name

    # -- naming resources in the test helpers ----------------------------------------------------

    def _resolve(self, ref: ResourceRef) -> ResourceType:
        """``"ray.io/v1/rayjobs"``, ``"v1/configmaps"``, a CrdSchema, or a unique plural,
        kind or short name (``"rayjobs"``, ``"RayJob"``, ``"cm"``)."""
        if isinstance(ref, ResourceType):
            return ref
        if isinstance(ref, CrdSchema):
            key: tuple[str, ...] = (ref.group, ref.version, ref.plural)
        else:
            key = tuple(ref.split("/"))
            key = ("", *key) if len(key) == 2 else key
        if key in self._types:
            return self._types[key]  # type: ignore[index]
        names = str(ref).lower()
        found = [
            t
            for t in self._types.values()
            if names in (t.plural, t.kind.lower(), t.singular, *t.short_names)
        ]
        if len(found) != 1:
            raise LookupError(f"not one registered resource is named {ref!r}: {found}")
        return found[0]

    def _type_of(self, obj: Mapping[str, Any]) -> ResourceType:
        for rtype in self._types.values():
            if (rtype.api_version, rtype.kind) == (obj.get("apiVersion"), obj.get("kind")):
                return rtype
        raise LookupError(f"no registered resource for {obj.get('apiVersion')} {obj.get('kind')}")

    @staticmethod
    def _scope(rtype: ResourceType, namespace: str | None) -> str | None:
        return namespace if rtype.namespaced else None


@contextlib.asynccontextmanager
async def emulated_cluster(
    tmp_path: Path, crd_paths: Iterable[str | Path] = (), **kwargs: Any
) -> AsyncIterator[tuple[KubeEmulator, Path]]:
    """A served emulator with the core resources, the CRDs and a ``default`` namespace;
    yields ``(kube, kubeconfig_path)``. ``kwargs`` go to :class:`KubeEmulator`; by default it is
    ``strict``: a request that crashed the emulator (a 500) fails the test at the exit."""
    kwargs.setdefault("strict", True)
    async with KubeEmulator(**kwargs) as kube, kmock.Server(kube) as server:
        kube.register_core_resources()
        for path in crd_paths:
            kube.register_crd(path)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        await kube.apply_object(namespace)
        kubeconfig = kube.write_kubeconfig(Path(tmp_path) / "kubeconfig", server)
        try:
            yield kube, kubeconfig
        finally:
            kube.stop_watches()
