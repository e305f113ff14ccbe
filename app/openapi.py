"""GET /openapi.json: one OpenAPI document from the paths each protocol describes of itself (built from
the parameter tables its checks use, so the description cannot drift from them)."""
from app.http import UJSONResponse
from app.schema import get


def route(*described):
    """The endpoint; described: functions of the app's state that return a protocol's OpenAPI paths."""

    async def openapi(request):
        state = request.app.state
        paths = {}
        for protocol_paths in described:
            paths.update(protocol_paths(state))
        paths["/openapi.json"] = get("This description", "openapi", {"type": "object"})
        document = {
            "openapi": "3.1.0",
            "info": {"title": "gpt2-run", "version": "1",
                     "description": f"GPT-2 text generation from {state.name} ({state.model.manifest['checkpoint']})"},
            "paths": paths}
        keyed = [route for route in request.app.routes if getattr(getattr(route, "endpoint", None), "needs_key", False)]
        for route in keyed:  # behind API keys (app/auth.py): say so, and describe the 401
            for method, operation in paths[route.path].items():
                if method != "head":
                    operation["security"] = [{"apiKey": []}]
                    error = operation["responses"].get("400", {}).get("content")
                    operation["responses"]["401"] = {"description": "no API key, or a wrong one",
                                                     **({"content": error} if error else {})}
        if keyed:
            document["components"] = {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}}
        return UJSONResponse(document)

    return openapi
