"""JSON-RPC 2.0 over HTTP: a method registry and the protocol layer; it knows nothing of the chain.

Where the specification (https://www.jsonrpc.org/specification) leaves a choice:

- "jsonrpc" must be exactly "2.0". Bitcoin Core also takes 1.0 requests; we do not, so that
  every answer has one shape (a result or an error member, never both).
- Every JSON-RPC answer, errors included, travels with HTTP 200. Other statuses belong to the
  transport only: 401 (credentials), 404, 405 (not POST), 413 (body over `max_body`), 500 (a bug
  in this layer). Their bodies are JSON-RPC error objects with id null (code -32600 for 4xx,
  -32603 for 500, the HTTP reason as message and nothing more), so clients parse one way.
- A request, or batch, that yields no response (notifications only) gets HTTP 204 and no body.
- An Invalid Request whose id is well formed gets that id back, so that batch clients can
  match it; otherwise the id is null, as the specification requires.
- A batch runs its calls one after another, in order: side effects (say, a transaction that
  spends another of the same batch) happen in the order the client wrote them.
- Ids may be strings, integers, finite numbers or null; other members of a request are ignored.
"""

import binascii
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict

from node.auth import Authenticator

log = logging.getLogger("dpodl.rpc")

# The specification's codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application codes; Bitcoin Core's numbers, so that its client habits carry over.
MISC_ERROR = -1
TYPE_ERROR = -3
INVALID_ADDRESS_OR_KEY = -5
NOT_FOUND = INVALID_ADDRESS_OR_KEY  # Core answers "block/transaction not found" with -5 too
OUT_OF_MEMORY = -7
INVALID_PARAMETER = -8
VERIFY_ERROR = -25
VERIFY_REJECTED = -26
IN_WARMUP = -28

Handler = Callable[..., Awaitable[object]]

_JSON = "application/json"


class RpcError(Exception):
    """An error the client receives as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True, slots=True)
class _Method:
    handler: Handler
    signature: inspect.Signature
    help: str


class RpcServer:
    """Binds JSON-RPC requests to registered async handlers, behind authentication."""

    def __init__(
        self, auth: Authenticator, *, max_body: int = 1 << 20, max_batch: int = 100
    ) -> None:
        self._auth = auth
        self._max_body = max_body
        self._max_batch = max_batch
        self._methods: dict[str, _Method] = {}
        self.health: Callable[[], dict] | None = None

    def method(self, name: str, handler: Handler, help: str) -> None:
        """Register `handler` as `name`; its Python signature is the parameter spec."""
        if name in self._methods:
            raise ValueError(f"RPC method {name!r} is already registered")
        if name.startswith("rpc."):
            raise ValueError(f"RPC method names starting with 'rpc.' are reserved: {name!r}")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"the handler of RPC method {name!r} must be an async function")
        self._methods[name] = _Method(handler, inspect.signature(handler), help)

    def methods(self) -> dict[str, str]:
        """Each registered method's help text, by name in alphabetical order."""
        return {name: self._methods[name].help for name in sorted(self._methods)}

    def app(self) -> web.Application:
        """The HTTP application: POST / is JSON-RPC, GET /health is unauthenticated."""
        app = web.Application(client_max_size=self._max_body, middlewares=[_json_errors])
        app.router.add_post("/", self._handle_rpc)
        app.router.add_get("/health", self._handle_health)
        return app

    async def call(self, name: str, params: list | dict) -> object:
        """Run method `name` with JSON params; every failure is raised as an RpcError."""
        method = self._methods.get(name)
        if method is None:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {name}")
        try:
            if isinstance(params, list):
                bound = method.signature.bind(*params)
            else:
                bound = method.signature.bind(**params)
        except TypeError as exc:
            raise RpcError(INVALID_PARAMS, f"Invalid params: {exc}") from None
        try:
            return await method.handler(*bound.args, **bound.kwargs)
        except RpcError:
            raise
        except Exception:
            # A handler bug must cost one call, not the server; the client learns nothing of it.
            log.exception("RPC method %s failed", name)
            raise RpcError(INTERNAL_ERROR, "Internal error") from None

    async def _handle_rpc(self, request: web.Request) -> web.Response:
        if not self._auth.check(request.headers.get(hdrs.AUTHORIZATION)):
            raise web.HTTPUnauthorized(headers={hdrs.WWW_AUTHENTICATE: 'Basic realm="jsonrpc"'})
        # Refuse an announced oversize body before reading it; a chunked one is cut off by
        # the application's client_max_size while it is read.
        if request.content_length is not None and request.content_length > self._max_body:
            raise web.HTTPRequestEntityTooLarge(self._max_body, request.content_length)
        reply = await self._reply(await request.read())
        if reply is None:
            return web.Response(status=204)
        return web.Response(text=reply, content_type=_JSON)

    async def _handle_health(self, request: web.Request) -> web.Response:
        status = self.health() if self.health is not None else {"status": "ok"}
        return web.Response(text=json.dumps(status, allow_nan=False), content_type=_JSON)

    async def _reply(self, body: bytes) -> str | None:
        """The response body for a request body, or None where nothing is to be answered."""
        try:
            message = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return _encode(None, RpcError(PARSE_ERROR, "Parse error"))
        if not isinstance(message, list):
            return await self._answer(message)
        if not message:
            return _encode(None, RpcError(INVALID_REQUEST, "Invalid Request: empty batch"))
        if len(message) > self._max_batch:
            reason = f"Invalid Request: batch of {len(message)} exceeds {self._max_batch} calls"
            return _encode(None, RpcError(INVALID_REQUEST, reason))
        replies = [await self._answer(element) for element in message]
        answered = [reply for reply in replies if reply is not None]
        return "[" + ",".join(answered) + "]" if answered else None

    async def _answer(self, message: object) -> str | None:
        """The encoded response to one request object, or None for a notification."""
        if not isinstance(message, dict):
            return _encode(None, RpcError(INVALID_REQUEST, "Invalid Request: not an object"))
        reason = _invalid_request_reason(message)
        if reason is not None:
            id_ = message.get("id") if _valid_id(message.get("id")) else None
            return _encode(id_, RpcError(INVALID_REQUEST, reason))
        try:
            outcome = await self.call(message["method"], message.get("params", []))
        except RpcError as exc:
            outcome = exc
        return _encode(message["id"], outcome) if "id" in message else None


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give transport errors (401, 404, 405, 413, 500) a JSON-RPC error body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:  # this application raises only 4xx ones
        headers = CIMultiDict(exc.headers)
        headers.popall(hdrs.CONTENT_TYPE, None)
        headers.popall(hdrs.CONTENT_LENGTH, None)
        code = INTERNAL_ERROR if exc.status >= 500 else INVALID_REQUEST
        status, text = exc.status, _encode(None, RpcError(code, exc.reason))
    except Exception:
        # The last line of defence: a bug in this layer or in `health` still answers in JSON.
        log.exception("RPC request to %s failed", request.path)
        headers = CIMultiDict()
        status, text = 500, _encode(None, RpcError(INTERNAL_ERROR, "Internal error"))
    return web.Response(status=status, headers=headers, text=text, content_type=_JSON)


def _encode(id_: object, outcome: object) -> str:
    """A response object as JSON: an error for an RpcError outcome, a result otherwise."""
    if isinstance(outcome, RpcError):
        response = {"jsonrpc": "2.0", "error": outcome.to_json(), "id": id_}
    else:
        response = {"jsonrpc": "2.0", "result": outcome, "id": id_}
    try:
        return json.dumps(response, allow_nan=False)
    except (TypeError, ValueError):
        log.exception("RPC response is not JSON-serialisable")
        error = {"code": INTERNAL_ERROR, "message": "Internal error"}
        return json.dumps({"jsonrpc": "2.0", "error": error, "id": id_})


def _invalid_request_reason(message: dict) -> str | None:
    """Why `message` is not a valid request object, or None where it is one."""
    if message.get("jsonrpc") != "2.0":
        return 'Invalid Request: "jsonrpc" must be "2.0"'
    if not isinstance(message.get("method"), str):
        return 'Invalid Request: "method" must be a string'
    if not isinstance(message.get("params", []), list | dict):
        return 'Invalid Request: "params" must be an array or an object'
    if not _valid_id(message.get("id")):
        return 'Invalid Request: "id" must be a string, a number or null'
    return None


def _valid_id(id_: object) -> bool:
    if isinstance(id_, bool):
        return False
    if isinstance(id_, float):
        return math.isfinite(id_)  # 1e999 parses as inf, which could not be written back
    return id_ is None or isinstance(id_, str | int)


def _reject_constant(name: str) -> object:
    # Python's json reads NaN and Infinity, which JSON does not have.
    raise ValueError(f"{name} is not JSON")


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def param_int(value: object, name: str, *, min: int | None = None, max: int | None = None) -> int:
    """`value` as an integer within [min, max]; booleans and fractions are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RpcError(TYPE_ERROR, f"{name} must be an integer, not {_json_type(value)}")
    if min is not None and value < min:
        raise RpcError(INVALID_PARAMETER, f"{name} must be at least {min}, got {value}")
    if max is not None and value > max:
        raise RpcError(INVALID_PARAMETER, f"{name} must be at most {max}, got {value}")
    return value


def param_str(value: object, name: str) -> str:
    """`value` as a string."""
    if not isinstance(value, str):
        raise RpcError(TYPE_ERROR, f"{name} must be a string, not {_json_type(value)}")
    return value


def param_bool(value: object, name: str) -> bool:
    """`value` as a boolean; 0 and 1 are refused."""
    if not isinstance(value, bool):
        raise RpcError(TYPE_ERROR, f"{name} must be a boolean, not {_json_type(value)}")
    return value


def param_hex(value: object, name: str, *, size: int | None = None) -> bytes:
    """`value`, a hex string without spaces or prefix, as bytes; exactly `size` of them if set."""
    text = param_str(value, name)
    try:
        data = binascii.unhexlify(text)  # unlike bytes.fromhex, refuses embedded spaces
    except ValueError:
        raise RpcError(INVALID_PARAMETER, f"{name} must be a hex string") from None
    if size is not None and len(data) != size:
        raise RpcError(INVALID_PARAMETER, f"{name} must be {size} bytes, got {len(data)}")
    return data
