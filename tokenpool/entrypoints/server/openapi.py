"""The published OpenAPI schema, made exact for the model being served.

FastAPI's schema comes from the request models, which know nothing of the model: here it learns the
served names (`model`), the context length (`truncate_prompt_tokens`), the vocabulary (token ids), the
embedding size (`dimensions`) and the API key. FastAPI's 422 answers are dropped: validation errors are
400s with the common error body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from tokenpool.entrypoints.server.serving import ServingState

_TOKEN_FIELDS = ("input", "tokens")


def install_openapi(app: FastAPI, state: ServingState, public_paths: frozenset[str]) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = specialize(build(), state, public_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def specialize(schema: dict[str, Any], state: ServingState, public_paths: frozenset[str]) -> dict[str, Any]:
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    limits = {
        "truncate_prompt_tokens": {"maximum": state.max_model_len},
        "dimensions": {"maximum": state.output_dims["embed"]} if "embed" in state.output_dims else None,
    }
    vocab = state.core.info.vocab_size
    for component in components.values():
        properties = component.get("properties", {})
        if "model" in properties and component.get("title", "").endswith("Request"):
            properties["model"]["anyOf"] = [{"type": "string", "enum": list(state.served_names)}, {"type": "null"}]
        for field, extra in limits.items():
            if field in properties and extra:
                _constrain(properties[field], "integer", extra)
        for field in _TOKEN_FIELDS:
            if field in properties:
                _constrain(properties[field], "integer", {"maximum": vocab - 1})
    if state.config.api_key:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "The server's --api-key."}
        schema["security"] = [{"bearer": []}]
        for path in public_paths:
            for operation in schema.get("paths", {}).get(path, {}).values():
                operation["security"] = []
    return schema


def _constrain(node: Any, type_name: str, extra: dict[str, Any]) -> None:
    """Add `extra` to every sub-schema of `type_name` in `node` (through anyOf / items)."""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            node.update(extra)
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, ()):
                _constrain(sub, type_name, extra)
        if "items" in node:
            _constrain(node["items"], type_name, extra)
