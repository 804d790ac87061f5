"""The OpenAPI document of the portal's JSON API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from mailplane_relay.events import STATUSES

_NS = {"name": "ns", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"}}
_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}


def _q(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _ok(schema: dict[str, Any], code: str = "200") -> dict[str, Any]:
    return {code: {"description": "ok", "content": {"application/json": {"schema": schema}}},
            "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR, "503": _ERROR}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


_S = {"type": "string"}
_SN = {"type": "string", "nullable": True}
_IN = {"type": "integer", "nullable": True}
_N = {"type": "number"}
_ROW = _obj({"time": _S, "ts": _N, "status": {"type": "string", "enum": list(STATUSES)},
             "queue_id": _SN, "message_id": _SN, "credential": _SN, "sender": _S,
             "recipient": _SN, "response": _SN, "size": _IN, "attempt": _IN, "remote": _SN},
            ("time", "ts", "status"))
_ERASURE = _obj({"id": _S, "namespace": _S, "requested_by": _S, "address": _S,
                 "state": {"type": "string", "enum": ["pending", "running", "done", "failed"]},
                 "created": _N, "finished": {"type": "number", "nullable": True},
                 "report": {"type": "object", "additionalProperties": {"type": "integer"}},
                 "error": _S}, ("id", "state"))
_SERIES = {"type": "object", "additionalProperties": _obj({
    "rates": {"type": "object", "additionalProperties": _N},
    "buckets": {"type": "array", "items": {"type": "object"}}})}
_LOG_PARAMS = [
    _NS,
    _q("sender", {"type": "string", "maxLength": 320}, "address, any case, or @domain"),
    _q("recipient", {"type": "string", "maxLength": 320}, "address, any case, or @domain"),
    _q("status", {"type": "string", "enum": list(STATUSES)}),
    _q("queue_id", {"type": "string", "maxLength": 64}),
    _q("credential", {"type": "string", "maxLength": 253}),
    _q("since", {"type": "string", "maxLength": 40}, "ISO 8601 (UTC unless a zone is given) "
       "or seconds since the epoch"),
    _q("until", {"type": "string", "maxLength": 40}, "as since; exclusive"),
    _q("page_size", {"type": "integer", "minimum": 1, "maximum": 500}),
    _q("cursor", {"type": "string", "maxLength": 100}, "next_cursor of the previous page"),
]


def document() -> dict[str, Any]:
    addr = {"type": "string", "maxLength": 320}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Mailplane portal API", "version": "1",
                 "description": "Each team's mail, scoped by Kubernetes namespace. "
                                "Authenticate with 'Authorization: Bearer TOKEN' (a token the "
                                "cluster accepts) or a portal session cookie plus "
                                "X-CSRF-Token on changes."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "session": {"type": "apiKey", "in": "cookie",
                                            "name": "mailplane_session"}},
            "schemas": {"Error": _obj({"error": _S, "status": {"type": "integer"}},
                                      ("error", "status"))},
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/api/v1/whoami": {"get": {"operationId": "whoami", "responses": _ok(_obj({
                "username": _S, "groups": {"type": "array", "items": _S}, "csrf": _S},
                ("username",)))}},
            "/api/v1/namespaces": {"get": {"operationId": "namespaces", "responses": _ok(_obj({
                "namespaces": {"type": "array", "items": _S}}, ("namespaces",)))}},
            "/api/v1/namespaces/{ns}/logs": {"get": {
                "operationId": "searchLogs", "parameters": _LOG_PARAMS,
                "responses": _ok(_obj({"namespace": _S, "items": {"type": "array",
                                                                 "items": _ROW},
                                       "next_cursor": _SN}, ("items", "next_cursor")))}},
            "/api/v1/namespaces/{ns}/messages/{queue_id}": {"get": {
                "operationId": "messageHistory",
                "parameters": [_NS, {"name": "queue_id", "in": "path", "required": True,
                                     "schema": {"type": "string", "minLength": 1,
                                                "maxLength": 64}}],
                "responses": _ok(_obj({"namespace": _S, "queue_id": _S, "events": {
                    "type": "array", "items": _ROW}}, ("events",)))}},
            "/api/v1/namespaces/{ns}/figures": {"get": {
                "operationId": "figures",
                "parameters": [_NS, _q("range", {"type": "string",
                                                 "enum": ["24h", "7d", "30d"]})],
                "responses": _ok(_obj({"namespace": _S, "range": _S, "bucket_seconds": {
                    "type": "integer"}, "since": _N, "credential": _SERIES,
                    "domain": _SERIES}))}},
            "/api/v1/namespaces/{ns}/resources": {"get": {
                "operationId": "resources", "parameters": [_NS],
                "responses": _ok(_obj({"namespace": _S, "credentials": {
                    "type": "array", "items": {"type": "object"}}, "domains": {
                    "type": "array", "nullable": True, "items": {"type": "object"}}}))}},
            "/api/v1/namespaces/{ns}/suppression": {
                "get": {"operationId": "listSuppression",
                        "parameters": [_NS, _q("q", {"type": "string", "maxLength": 320})],
                        "responses": _ok(_obj({"items": {"type": "array", "items": _obj({
                            "address": _S, "scope": {"type": "string", "enum": ["team", "pool"]},
                            "reason": _S, "source": _S, "created": _N})}}))},
                "post": {"operationId": "addSuppression", "parameters": [_NS],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": _obj({"address": addr, "note": {
                                 "type": "string", "maxLength": 300}}, ("address",))}}},
                         "responses": _ok(_obj({"address": _S, "reason": _S}), "201")},
            },
            "/api/v1/namespaces/{ns}/suppression/{address}": {"delete": {
                "operationId": "removeSuppression",
                "parameters": [_NS, {"name": "address", "in": "path", "required": True,
                                     "schema": addr},
                               {**_q("reason", {"type": "string", "maxLength": 300}),
                                "required": True}],
                "responses": {**_ok(_obj({"removed": _S})), "409": _ERROR}}},
            "/api/v1/namespaces/{ns}/erasures": {
                "get": {"operationId": "listErasures", "parameters": [_NS],
                        "responses": _ok(_obj({"items": {"type": "array",
                                                         "items": _ERASURE}}))},
                "post": {"operationId": "requestErasure", "parameters": [_NS],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": _obj({"address": addr}, ("address",))}}},
                         "responses": _ok(_ERASURE, "202")},
            },
            "/api/v1/namespaces/{ns}/erasures/{id}": {"get": {
                "operationId": "getErasure",
                "parameters": [_NS, {"name": "id", "in": "path", "required": True,
                                     "schema": {"type": "string", "maxLength": 64}}],
                "responses": _ok(_ERASURE)}},
            "/api/v1/namespaces/{ns}/audit": {"get": {
                "operationId": "auditLog", "parameters": [_NS],
                "responses": _ok(_obj({"items": {"type": "array", "items": _obj({
                    "ts": _N, "actor": _S, "action": _S, "target": _S, "detail": _S})}}))}},
        },
    }
