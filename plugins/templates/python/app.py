"""The smallest useful Python plugin, and the starting point for a new one: greets the caller.

Replace `handle` with your plugin's work. The platform's interfaces are `wit_world.imports`:
`inference` (classify, embed, infer), `kv`, `config` and `log`; see ../README.md.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.handler import Error_InvalidRequest
from wit_world.imports import log


class Handler(exports.Handler):
    def handle(self, request: str) -> str:
        try:
            body = json.loads(request)
        except ValueError as err:
            raise Err(Error_InvalidRequest(f"the request is not JSON: {err}"))
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise Err(Error_InvalidRequest("`name` (a string) is required"))
        log.log(log.Level.INFO, f"greeting a name of {len(name)} characters")
        return json.dumps({"greeting": f"Hello, {name}!"})
