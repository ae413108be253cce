"""Schemas of the custom resources the program creates, for offline validation (``infra/render.py``).

``kubernetes-validate`` knows only the built-in kinds. For a custom resource the cluster validates
against its CRD's ``openAPIV3Schema``; here each kind gets a JSON schema of the part of that CRD this
program uses, written from the CRD of the pinned version (KEDA :data:`infra.baseline.KEDA_CHART_VERSION`,
``keda.sh/v1alpha1``) with the same field names, types, required fields and bounds. It is stricter
than the CRD in one way only: a field outside that part is an error (like ``strict`` for built-in kinds),
so a misspelt or unplanned field fails the render instead of being pruned by the API server.
"""

from __future__ import annotations

from typing import Any

import jsonschema

INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


STRING: dict[str, Any] = {"type": "string"}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": STRING}
METADATA = _object(
    {"name": STRING, "namespace": STRING, "labels": STRING_MAP, "annotations": STRING_MAP}, required=("name",)
)


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _object(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        required=("apiVersion", "kind", "metadata", "spec"),
    )


_SCALE_RULES = _object(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": STRING,
        "policies": _array(
            _object({"type": STRING, "value": INT32, "periodSeconds": INT32}, ("type", "value", "periodSeconds"))
        ),
    }
)
SCALED_OBJECT_SPEC = _object(
    {
        "scaleTargetRef": _object(
            {"apiVersion": STRING, "kind": STRING, "name": STRING, "envSourceContainerName": STRING}, ("name",)
        ),
        "pollingInterval": INT32,
        "cooldownPeriod": INT32,
        "minReplicaCount": INT32,
        "maxReplicaCount": INT32,
        "advanced": _object(
            {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": _object(
                    {"name": STRING, "behavior": _object({"scaleUp": _SCALE_RULES, "scaleDown": _SCALE_RULES})}
                ),
            }
        ),
        "triggers": _array(
            _object(
                {
                    "type": STRING,
                    "name": STRING,
                    "metricType": STRING,
                    "useCachedMetrics": {"type": "boolean"},
                    "metadata": STRING_MAP,
                    "authenticationRef": _object({"kind": STRING, "name": STRING}, ("name",)),
                },
                ("type", "metadata"),
            )
        ),
    },
    ("scaleTargetRef", "triggers"),
)
TRIGGER_AUTHENTICATION_SPEC = _object(
    {
        "secretTargetRef": _array(
            _object({"parameter": STRING, "name": STRING, "key": STRING}, ("parameter", "name", "key"))
        )
    }
)
SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _resource("keda.sh/v1alpha1", "ScaledObject", SCALED_OBJECT_SPEC),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _resource(
        "keda.sh/v1alpha1", "TriggerAuthentication", TRIGGER_AUTHENTICATION_SPEC
    ),
}


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in SCHEMAS


def validate(obj: dict[str, Any]) -> list[str]:
    """Problems of one custom resource against its schema (empty = valid), each with the field's path."""
    schema = SCHEMAS[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft202012Validator(schema)
    where = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
    return [
        f"{where} {'/'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]
