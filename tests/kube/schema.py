"""Validation of custom objects against a CRD's ``openAPIV3Schema``, as kube-apiserver does it.

The OpenAPI v3 schema of a CRD (``apiextensions.k8s.io/v1``) is converted once into JSON Schema
(draft 2020-12) and checked with :mod:`jsonschema`; errors are reported the Kubernetes way, as
``"path.to.field: message"`` with list indices as ``[3]``.

What is emulated (the server with ``fieldValidation=Strict``):

* unknown fields: an error wherever a schema object declares ``properties`` and does not have
  ``x-kubernetes-preserve-unknown-fields: true``; ``additionalProperties`` schemas apply to map
  values; ``x-kubernetes-embedded-resource`` objects also allow apiVersion/kind/metadata;
* values: ``type`` (with ``nullable`` and ``x-kubernetes-int-or-string``), ``required``, ``enum``,
  ``format`` (int32, int64, date-time, date; other formats are ignored), ``minimum``/``maximum``
  (and their OpenAPI-v3 boolean ``exclusive*`` flags), ``minLength``/``maxLength``,
  ``minItems``/``maxItems``, ``minProperties``/``maxProperties``, ``pattern``, ``uniqueItems``,
  ``x-kubernetes-list-type`` ``set`` (unique items) and ``map`` (unique ``list-map-keys``);
* top-level ``metadata`` is only checked to be an object whose ``name`` is a DNS-1123 subdomain;
* :meth:`CrdSchema.normalize` does what the server does to a write before validating it: drops
  ``null`` values of non-nullable fields and fills in ``default`` values.

Deliberately left out: CEL rules (``x-kubernetes-validations``), conversion between versions,
ratcheting (tolerating unchanged invalid values on update), the 400 "strict decoding error"
wording that a real server uses for unknown fields (reported here with the other errors).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import jsonschema.validators
import yaml

__all__ = ["CrdSchema", "SchemaError", "format_path", "is_dns1123_subdomain"]

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster on big CRDs
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# Markers kept in the converted schema: ignored by jsonschema, read back for the error messages.
_INT_OR_STRING = "x-kubernetes-int-or-string"
_LIST_MAP_KEYS = "x-kubernetes-list-map-keys"

# Keywords that mean the same in OpenAPI v3 (as CRDs use it) and in JSON Schema 2020-12.
_SAME_KEYWORDS = (
    "enum",
    "required",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "uniqueItems",
)


class SchemaError(NamedTuple):
    """One validation error: where (a path of keys and list indices) and what."""

    path: tuple[str | int, ...]
    detail: str
    reason: str  # as in a Status' details.causes: FieldValueInvalid, FieldValueRequired, ...

    @property
    def field(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}"


def format_path(path: tuple[str | int, ...] | list[str | int]) -> str:
    """``("spec", "items", 3, "name")`` -> ``"spec.items[3].name"`` (``"<root>"`` if empty)."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "<root>"


def is_dns1123_subdomain(name: str) -> bool:
    """What Kubernetes requires of most object names: lowercase, dots and dashes, <= 253 chars."""
    return len(name) <= 253 and bool(_DNS1123_SUBDOMAIN.match(name))


class CrdSchema:
    """A CustomResourceDefinition: its names for serving, and its schema for validating.

    Only one version is used: the storage version unless ``version`` names another served one.
    """

    def __init__(self, crd: Mapping[str, Any], version: str | None = None) -> None:
        if crd.get("kind") != "CustomResourceDefinition":
            raise ValueError(f"Not a CustomResourceDefinition: kind={crd.get('kind')!r}")
        spec = crd["spec"]
        names = spec["names"]
        served = [v for v in spec["versions"] if v.get("served", True)]
        if version is None:
            chosen = next((v for v in served if v.get("storage")), served[0])
        else:
            chosen = next(v for v in served if v["name"] == version)

        self.crd: Mapping[str, Any] = crd
        self.group: str = spec["group"]
        self.version: str = chosen["name"]
        self.plural: str = names["plural"]
        self.kind: str = names["kind"]
        self.singular: str = names.get("singular") or self.kind.lower()
        self.list_kind: str = names.get("listKind") or f"{self.kind}List"
        self.short_names: tuple[str, ...] = tuple(names.get("shortNames") or ())
        self.categories: tuple[str, ...] = tuple(names.get("categories") or ())
        self.namespaced: bool = spec.get("scope", "Namespaced") == "Namespaced"
        self.status_subresource: bool = "status" in (chosen.get("subresources") or {})
        self.selectable_fields: tuple[str, ...] = tuple(
            field["jsonPath"].lstrip(".") for field in chosen.get("selectableFields") or ()
        )
        self.openapi: Mapping[str, Any] = (chosen.get("schema") or {}).get("openAPIV3Schema") or {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }

    def __repr__(self) -> str:
        return f"<CrdSchema {self.resource} kind={self.kind}>"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def resource(self) -> str:
        """The resource as the emulator names it: ``"ray.io/v1/rayjobs"``."""
        return f"{self.group}/{self.version}/{self.plural}"

    @classmethod
    def from_dict(cls, crd: Mapping[str, Any], version: str | None = None) -> CrdSchema:
        return cls(crd, version=version)

    @classmethod
    def from_file(cls, path: str | Path) -> CrdSchema:
        """The only CRD of a YAML file; parsed once per file content (the validator is cached)."""
        crds = cls.all_from_file(path)
        if len(crds) != 1:
            raise ValueError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
        return crds[0]

    @classmethod
    def all_from_file(cls, path: str | Path) -> list[CrdSchema]:
        """Every CRD of a (multi-document) YAML file."""
        resolved = Path(path).resolve()
        return list(_load_file(str(resolved), resolved.stat().st_mtime_ns))

    # -- validation --------------------------------------------------------------------------

    @functools.cached_property
    def json_schema(self) -> dict[str, Any]:
        """The ``openAPIV3Schema`` converted to JSON Schema draft 2020-12."""
        return _convert(self.openapi, root=True)

    @functools.cached_property
    def _validator(self) -> jsonschema.protocols.Validator:
        return _Validator(self.json_schema, format_checker=_FORMATS)

    def errors(self, obj: Mapping[str, Any]) -> list[SchemaError]:
        """All errors of an object (a whole custom resource: apiVersion, kind, metadata, ...)."""
        found: dict[tuple[tuple[str | int, ...], str], SchemaError] = {}
        for error in self._validator.iter_errors(obj):
            for item in _to_schema_errors(error):
                found.setdefault((item.path, item.detail), item)
        metadata = obj.get("metadata")
        if isinstance(metadata, Mapping):
            name = metadata.get("name")
            if isinstance(name, str) and not is_dns1123_subdomain(name):
                detail = (
                    f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 subdomain must"
                    " consist of lower case alphanumeric characters, '-' or '.', and must start"
                    " and end with an alphanumeric character (at most 253 characters)"
                )
                found[(("metadata", "name"), detail)] = SchemaError(
                    ("metadata", "name"), detail, "FieldValueInvalid"
                )
        return sorted(found.values(), key=lambda e: (e.field, e.detail))

    def validate(self, obj: Mapping[str, Any]) -> list[str]:
        """Errors as strings ``"path.to.field: message"``; empty if the object is valid."""
        return [str(error) for error in self.errors(obj)]

    def prune_unknown(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A copy without the undeclared fields, and their paths (``fieldValidation=Ignore``)."""
        result = copy.deepcopy(dict(obj))
        unknown = [error for error in self.errors(result) if error.reason == "FieldValueUnknown"]
        for error in unknown:
            parent: Any = result
            for part in error.path[:-1]:
                parent = parent[part]
            parent.pop(error.path[-1], None)
        return result, [error.field for error in unknown]

    def normalize(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """A copy as the server stores it: nulls of non-nullable fields dropped, defaults set."""
        result = copy.deepcopy(dict(obj))
        _normalize(result, self.openapi, root=True)
        return result


@functools.lru_cache(maxsize=32)
def _load_file(path: str, mtime_ns: int) -> tuple[CrdSchema, ...]:
    with open(path, encoding="utf-8") as f:
        docs = list(yaml.load_all(f, Loader=_YAML_LOADER))
    return tuple(
        CrdSchema(doc)
        for doc in docs
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
    )


# -- OpenAPI v3 (Kubernetes flavour) -> JSON Schema 2020-12 ---------------------------------------


def _convert(node: Mapping[str, Any], *, root: bool = False, junctor: bool = False) -> dict:
    """Convert one schema node; ``junctor``: inside allOf/anyOf/oneOf/not (no pruning there)."""
    out: dict[str, Any] = {}
    nullable = bool(node.get("nullable"))
    if node.get(_INT_OR_STRING):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out[_INT_OR_STRING] = True
    elif "type" in node:
        out["type"] = [node["type"], "null"] if nullable else node["type"]
    for key in _SAME_KEYWORDS:
        if key in node:
            out[key] = node[key]
    if nullable and "enum" in out:
        out["enum"] = [*out["enum"], None]
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(exclusive) is True and bound in node:  # OpenAPI v3.0: a flag on the bound
            out[exclusive] = out.pop(bound)
        elif isinstance(node.get(exclusive), int | float) and not isinstance(node[exclusive], bool):
            out[exclusive] = node[exclusive]
    if "pattern" in node and _compiles(node["pattern"]):
        out["pattern"] = node["pattern"]

    if "properties" in node:
        properties = {key: _convert(sub) for key, sub in node["properties"].items()}
        if node.get("x-kubernetes-embedded-resource") or root:
            properties.setdefault("apiVersion", {"type": "string"})
            properties.setdefault("kind", {"type": "string"})
            properties.setdefault("metadata", {"type": "object"})
        if root:
            properties["metadata"] = {"type": "object"}  # ObjectMeta is the server's business
        out["properties"] = properties
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        if not preserve and not junctor and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if "additionalProperties" in node:
        extra = node["additionalProperties"]
        out["additionalProperties"] = _convert(extra) if isinstance(extra, Mapping) else extra
    if isinstance(node.get("items"), Mapping):
        out["items"] = _convert(node["items"])

    for key in ("allOf", "anyOf", "oneOf"):
        if key in node and not (key == "anyOf" and node.get(_INT_OR_STRING)):
            out[key] = [_convert(sub, junctor=True) for sub in node[key]]
    if "not" in node:
        out["not"] = _convert(node["not"], junctor=True)

    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map" and node.get(_LIST_MAP_KEYS):
        out[_LIST_MAP_KEYS] = list(node[_LIST_MAP_KEYS])
    return out


@functools.lru_cache(maxsize=4096)
def _compiles(pattern: str) -> bool:
    """Kubernetes patterns are Go RE2; the few that Python cannot compile are skipped."""
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _unique_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """``x-kubernetes-list-type: map``: no two items may have the same values of the keys."""
    if not isinstance(instance, list):
        return
    seen: set[str] = set()
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = json.dumps({k: item.get(k) for k in keys}, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"Duplicate value: {key}", path=(index,))
        seen.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {_LIST_MAP_KEYS: _unique_map_keys}
)

_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _is_int32(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _is_int64(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


@_FORMATS.checks("date-time")
def _is_date_time(value: Any) -> bool:
    return not isinstance(value, str) or bool(_RFC3339.match(value))


@_FORMATS.checks("date")
def _is_date(value: Any) -> bool:
    return not isinstance(value, str) or bool(_DATE.match(value))


# -- errors in Kubernetes wording ------------------------------------------------------------


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _to_schema_errors(error: jsonschema.ValidationError) -> list[SchemaError]:
    """One jsonschema error -> Kubernetes-style errors (unknown/required: one per field)."""
    path = tuple(error.absolute_path)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties" and value is False:
        declared = error.schema.get("properties", {})
        return [
            SchemaError((*path, key), "unknown field", "FieldValueUnknown")
            for key in instance
            if key not in declared
        ]
    if kind == "required":
        return [
            SchemaError((*path, key), "Required value", "FieldValueRequired")
            for key in value
            if key not in instance
        ]
    if kind == "enum":
        allowed = ", ".join(_show(item) for item in value)
        detail = f"Unsupported value: {_show(instance)}: supported values: {allowed}"
        return [SchemaError(path, detail, "FieldValueNotSupported")]
    if kind == "type" or (kind == "anyOf" and error.schema.get(_INT_OR_STRING)):
        expected = "integer or string" if kind == "anyOf" else value
        if isinstance(expected, list):
            expected = " or ".join(t for t in expected if t != "null")
        detail = f"Invalid value: {_show(_json_type(instance))}: must be of type {expected}"
        return [SchemaError(path, detail, "FieldValueTypeInvalid")]
    return [SchemaError(path, _describe(kind, value, instance, error), _reason(kind))]


def _describe(kind: str, value: Any, instance: Any, error: jsonschema.ValidationError) -> str:
    shown = _show(instance)
    match kind:
        case "minimum":
            return f"Invalid value: {shown}: should be greater than or equal to {value}"
        case "maximum":
            return f"Invalid value: {shown}: should be less than or equal to {value}"
        case "exclusiveMinimum":
            return f"Invalid value: {shown}: should be greater than {value}"
        case "exclusiveMaximum":
            return f"Invalid value: {shown}: should be less than {value}"
        case "minLength":
            return f"Invalid value: {shown}: should be at least {value} chars long"
        case "maxLength":
            return f"Too long: may not be more than {value} bytes"
        case "minItems":
            return f"Invalid value: {len(instance)}: should have at least {value} items"
        case "maxItems" | "maxProperties":
            return f"Too many: {len(instance)}: must have at most {value} items"
        case "minProperties":
            return f"Invalid value: {len(instance)}: should have at least {value} properties"
        case "pattern":
            return f"Invalid value: {shown}: should match '{value}'"
        case "format":
            return f"Invalid value: {shown}: must be of format {value}"
        case "uniqueItems" | "x-kubernetes-list-map-keys":
            return error.message if kind == _LIST_MAP_KEYS else f"Duplicate value: {shown}"
    return f"Invalid value: {shown}: {error.message}"


def _reason(kind: str) -> str:
    if kind in ("uniqueItems", _LIST_MAP_KEYS):
        return "FieldValueDuplicate"
    if kind in ("maxLength",):
        return "FieldValueTooLong"
    if kind in ("maxItems", "maxProperties"):
        return "FieldValueTooMany"
    return "FieldValueInvalid"


# -- server-side normalization (pruning of nulls, defaulting) ------------------------------------


def _normalize(value: Any, node: Mapping[str, Any], *, root: bool = False) -> None:
    """In place: drop nulls where ``nullable`` is not set, then fill in ``default`` values."""
    if isinstance(value, dict):
        properties = node.get("properties") or {}
        extra = node.get("additionalProperties")
        extra = extra if isinstance(extra, Mapping) else None

        def schema_of(key: str) -> Mapping[str, Any] | None:
            if root and key == "metadata":
                return None  # ObjectMeta: not defaulted from the CRD
            return properties.get(key, extra)

        for key in list(value):
            sub = schema_of(key)
            if value[key] is None and sub is not None and not sub.get("nullable"):
                del value[key]
        for key, sub in properties.items():
            if key not in value and "default" in sub and schema_of(key) is not None:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            sub = schema_of(key)
            if sub is not None and item is not None:
                _normalize(item, sub)
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for item in value:
            _normalize(item, node["items"])
