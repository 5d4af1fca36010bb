"""The JSON-RPC 2.0 server over real HTTP: the specification's examples, auth, limits, errors."""

import asyncio
import base64
import json
import logging
import math
import stat
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from node.auth import (
    COOKIE_USER,
    Authenticator,
    CookieError,
    make_rpcauth,
    read_cookie,
    remove_cookie,
    write_cookie,
)
from node.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMETER,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    TYPE_ERROR,
    VERIFY_REJECTED,
    RpcError,
    RpcServer,
    param_bool,
    param_hex,
    param_int,
    param_str,
)

COOKIE = (COOKIE_USER, "c00k1e")
ALICE_LINE, ALICE_PASSWORD = make_rpcauth("alice", "wonderland")
MAX_BODY = 8192
MAX_BATCH = 8


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH = {"Authorization": basic(*COOKIE)}


class Calls:
    """What the handlers saw, so that tests can tell whether a method ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple]] = []


def build_server(calls: Calls) -> RpcServer:
    server = RpcServer(Authenticator(COOKIE, [ALICE_LINE]), max_body=MAX_BODY, max_batch=MAX_BATCH)

    async def subtract(minuend: int, subtrahend: int) -> int:
        return param_int(minuend, "minuend") - param_int(subtrahend, "subtrahend")

    async def sum_(*numbers: int) -> int:
        return sum(numbers)

    async def record(*args: object) -> None:
        calls.seen.append(("record", args))

    async def get_data() -> list:
        return ["hello", 5]

    async def getblock(height: object, verbose: object = False) -> dict:
        return {"height": param_int(height, "height", min=0, max=1000),
                "verbose": param_bool(verbose, "verbose")}

    async def crash() -> None:
        raise KeyError("secret internal detail")

    async def refuse() -> None:
        raise RpcError(VERIFY_REJECTED, "bad-txn-nonce", {"nonce": 3})

    async def unserialisable() -> object:
        return {"value": object()}

    async def not_a_number() -> float:
        return math.nan

    for name, handler in [
        ("subtract", subtract), ("sum", sum_), ("update", record), ("notify_hello", record),
        ("notify_sum", record), ("get_data", get_data), ("getblock", getblock),
        ("crash", crash), ("refuse", refuse), ("unserialisable", unserialisable),
        ("not_a_number", not_a_number),
    ]:
        server.method(name, handler, f"help for {name}")
    return server


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def server(calls: Calls) -> RpcServer:
    return build_server(calls)


@pytest.fixture
async def client(server: RpcServer):
    async with TestClient(TestServer(server.app())) as client:
        yield client


async def post(client: TestClient, body: str | bytes, headers: dict = AUTH) -> object:
    """POST a raw body; the decoded JSON answer, or None after checking it was 204 and empty."""
    response = await client.post("/", data=body, headers=headers)
    if response.status == 204:
        assert await response.read() == b""
        return None
    assert response.status == 200
    assert response.content_type == "application/json"
    return await response.json()


def standard(answer: object) -> object:
    """The answer with error messages cut to their standard part ("Invalid Request: x" -> ...)."""
    if isinstance(answer, list):
        return [standard(item) for item in answer]
    if isinstance(answer, dict) and "error" in answer:
        error = dict(answer["error"], message=answer["error"]["message"].split(":")[0])
        return dict(answer, error=error)
    return answer


def error(code: int, message: str, id_: object) -> dict:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id_}


# The "Examples" section of https://www.jsonrpc.org/specification, verbatim.
SPEC_EXAMPLES = {
    "positional-1": (
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        {"jsonrpc": "2.0", "result": 19, "id": 1},
    ),
    "positional-2": (
        '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
        {"jsonrpc": "2.0", "result": -19, "id": 2},
    ),
    "named-1": (
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, '
        '"id": 3}',
        {"jsonrpc": "2.0", "result": 19, "id": 3},
    ),
    "named-2": (
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, '
        '"id": 4}',
        {"jsonrpc": "2.0", "result": 19, "id": 4},
    ),
    "notification": ('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', None),
    "notification-unknown-method": ('{"jsonrpc": "2.0", "method": "foobar"}', None),
    "non-existent-method": (
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        error(METHOD_NOT_FOUND, "Method not found", "1"),
    ),
    "invalid-json": (
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        error(PARSE_ERROR, "Parse error", None),
    ),
    "invalid-request-object": (
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        error(INVALID_REQUEST, "Invalid Request", None),
    ),
    "batch-invalid-json": (
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        '{"jsonrpc": "2.0", "method"]',
        error(PARSE_ERROR, "Parse error", None),
    ),
    "empty-array": ("[]", error(INVALID_REQUEST, "Invalid Request", None)),
    "invalid-batch-one": ("[1]", [error(INVALID_REQUEST, "Invalid Request", None)]),
    "invalid-batch-three": ("[1,2,3]", [error(INVALID_REQUEST, "Invalid Request", None)] * 3),
    "mixed-batch": (
        """[
            {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
            {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
            {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
            {"foo": "boo"},
            {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
            {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
        ]""",
        [
            {"jsonrpc": "2.0", "result": 7, "id": "1"},
            {"jsonrpc": "2.0", "result": 19, "id": "2"},
            error(INVALID_REQUEST, "Invalid Request", None),
            error(METHOD_NOT_FOUND, "Method not found", "5"),
            {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
        ],
    ),
    "all-notifications-batch": (
        '[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
        '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]',
        None,
    ),
}


@pytest.mark.parametrize("body, expected", SPEC_EXAMPLES.values(), ids=SPEC_EXAMPLES.keys())
async def test_specification_examples(client: TestClient, body: str, expected: object) -> None:
    assert standard(await post(client, body)) == expected


async def test_notifications_run_without_answer(client: TestClient, calls: Calls) -> None:
    assert await post(client, SPEC_EXAMPLES["notification"][0]) is None
    assert await post(client, SPEC_EXAMPLES["all-notifications-batch"][0]) is None
    assert calls.seen == [("record", (1, 2, 3, 4, 5)), ("record", (1, 2, 4)), ("record", (7,))]


@pytest.mark.parametrize("request_object, id_", [
    ({"jsonrpc": "1.0", "method": "get_data", "id": 7}, 7),
    ({"method": "get_data", "id": "a"}, "a"),
    ({"jsonrpc": "2.0", "method": "get_data", "params": 5, "id": 8}, 8),
    ({"jsonrpc": "2.0", "method": "get_data", "id": {"an": "object"}}, None),
    ({"jsonrpc": "2.0", "method": "get_data", "id": True}, None),
    ({"jsonrpc": "2.0", "method": ["get_data"], "id": 9}, 9),
])
async def test_invalid_request_objects(client: TestClient, request_object: dict, id_) -> None:
    answer = await post(client, json.dumps(request_object))
    assert answer["error"]["code"] == INVALID_REQUEST
    assert answer["id"] == id_


@pytest.mark.parametrize("body", [
    b'{"jsonrpc": "2.0", "method": "get_data", "id": NaN}',
    b"[" * 3000 + b"]" * 3000,  # deeper than the parser may recurse
    b'{"jsonrpc": "2.0", "method": "\xff", "id": 1}',
])
async def test_parse_errors(client: TestClient, body: bytes) -> None:
    assert await post(client, body) == error(PARSE_ERROR, "Parse error", None)


async def test_id_forms_are_echoed(client: TestClient) -> None:
    for id_ in ["x", 0, -5, 2.5, None]:
        answer = await post(client, json.dumps({"jsonrpc": "2.0", "method": "get_data", "id": id_}))
        assert answer == {"jsonrpc": "2.0", "result": ["hello", 5], "id": id_}


@pytest.mark.parametrize("params, fragment", [
    ([1], "'subtrahend'"),
    ({"minuend": 1}, "'subtrahend'"),
    ([1, 2, 3], "too many positional arguments"),
    ({"minuend": 1, "subtrahend": 2, "extra": 3}, "'extra'"),
])
async def test_binding_failures_name_the_parameter(client: TestClient, params, fragment) -> None:
    request = {"jsonrpc": "2.0", "method": "subtract", "params": params, "id": 1}
    answer = await post(client, json.dumps(request))
    assert answer["error"]["code"] == INVALID_PARAMS
    assert fragment in answer["error"]["message"]


@pytest.mark.parametrize("params, code, message", [
    (["5"], TYPE_ERROR, "height must be an integer, not string"),
    ([True], TYPE_ERROR, "height must be an integer, not boolean"),
    ([5.0], TYPE_ERROR, "height must be an integer, not number"),
    ([-1], INVALID_PARAMETER, "height must be at least 0, got -1"),
    ([1001], INVALID_PARAMETER, "height must be at most 1000, got 1001"),
    ([5, 1], TYPE_ERROR, "verbose must be a boolean, not number"),
])
async def test_wrong_param_types(client: TestClient, params, code: int, message: str) -> None:
    request = {"jsonrpc": "2.0", "method": "getblock", "params": params, "id": 1}
    assert await post(client, json.dumps(request)) == error(code, message, 1)
    request["params"] = {"height": 5, "verbose": True}
    assert (await post(client, json.dumps(request)))["result"] == {"height": 5, "verbose": True}


async def test_rpc_error_passes_through_with_data(client: TestClient) -> None:
    answer = await post(client, '{"jsonrpc": "2.0", "method": "refuse", "id": 1}')
    assert answer["error"] == {"code": -26, "message": "bad-txn-nonce", "data": {"nonce": 3}}


async def test_handler_crash_is_internal_error_and_server_goes_on(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="dpodl.rpc"):
        response = await client.post(
            "/", data='{"jsonrpc": "2.0", "method": "crash", "id": 1}', headers=AUTH
        )
    text = await response.text()
    assert json.loads(text) == error(INTERNAL_ERROR, "Internal error", 1)
    assert "secret" not in text and "Traceback" not in text
    assert any(record.exc_info and record.name == "dpodl.rpc" for record in caplog.records)
    answer = await post(client, '{"jsonrpc": "2.0", "method": "get_data", "id": 2}')
    assert answer["result"] == ["hello", 5]


@pytest.mark.parametrize("method", ["unserialisable", "not_a_number"])
async def test_unserialisable_result_is_internal_error(client: TestClient, method: str) -> None:
    batch = [{"jsonrpc": "2.0", "method": method, "id": 1},
             {"jsonrpc": "2.0", "method": "get_data", "id": 2}]
    assert await post(client, json.dumps(batch)) == [
        error(INTERNAL_ERROR, "Internal error", 1),
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": 2},
    ]


async def test_batch_limit(client: TestClient) -> None:
    one = {"jsonrpc": "2.0", "method": "get_data", "id": 1}
    assert len(await post(client, json.dumps([one] * MAX_BATCH))) == MAX_BATCH
    answer = await post(client, json.dumps([one] * (MAX_BATCH + 1)))
    assert answer["error"]["code"] == INVALID_REQUEST and answer["id"] is None


UNAUTHORISED = [
    None,
    "Basic !!!not-base64",
    "Basic " + base64.b64encode(b"no-colon").decode(),
    "Bearer " + base64.b64encode(b"__cookie__:c00k1e").decode(),
    basic(COOKIE_USER, "wrong"),
    basic("alice", "c00k1e"),
    basic("alice", "wrong"),
    basic("bob", "wonderland"),
    basic("alice", "wonderland "),
]


@pytest.mark.parametrize("header", UNAUTHORISED)
async def test_bad_credentials_get_401(client: TestClient, calls: Calls, header) -> None:
    headers = {} if header is None else {"Authorization": header}
    body = '{"jsonrpc": "2.0", "method": "update", "params": [1], "id": 1}'
    response = await client.post("/", data=body, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="jsonrpc"'
    assert response.content_type == "application/json"
    assert await response.json() == error(INVALID_REQUEST, "Unauthorized", None)
    assert calls.seen == []


@pytest.mark.parametrize("user, password", [COOKIE, ("alice", "wonderland")])
async def test_good_credentials(client: TestClient, user: str, password: str) -> None:
    body = '{"jsonrpc": "2.0", "method": "get_data", "id": 1}'
    answer = await post(client, body, headers={"Authorization": basic(user, password)})
    assert answer["result"] == ["hello", 5]


async def test_health_needs_no_auth(client: TestClient, server: RpcServer) -> None:
    response = await client.get("/health")
    assert response.status == 200 and response.content_type == "application/json"
    assert await response.json() == {"status": "ok"}
    server.health = lambda: {"status": "syncing", "height": 12}
    assert await (await client.get("/health")).json() == {"status": "syncing", "height": 12}


async def test_health_failure_still_answers_json(client: TestClient, server: RpcServer) -> None:
    server.health = lambda: {"value": object()}
    response = await client.get("/health")
    assert response.status == 500
    assert await response.json() == error(INTERNAL_ERROR, "Internal error", None)


async def test_oversize_body_gets_413_and_server_goes_on(client: TestClient, calls: Calls) -> None:
    padding = " " * MAX_BODY
    body = '{"jsonrpc": "2.0", "method": "update", "params": [1], "id": 1}' + padding

    async def chunks():
        yield body.encode()

    for data in [body, chunks()]:  # announced with Content-Length, and chunked
        response = await client.post("/", data=data, headers=AUTH)
        assert response.status == 413
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == INVALID_REQUEST
    assert calls.seen == []
    assert (await post(client, '{"jsonrpc": "2.0", "method": "get_data", "id": 1}'))["id"] == 1


async def test_announced_oversize_body_is_refused_before_it_arrives(client: TestClient) -> None:
    never = asyncio.Event()

    async def stalled():
        yield b"[" * 100
        await never.wait()  # a server that waited for this body would never answer

    headers = dict(AUTH, **{"Content-Length": str(10**9)})
    response = await asyncio.wait_for(client.post("/", data=stalled(), headers=headers), 2)
    assert response.status == 413
    assert (await post(client, '{"jsonrpc": "2.0", "method": "get_data", "id": 1}'))["id"] == 1


async def test_other_http_methods_and_paths_get_json(client: TestClient) -> None:
    response = await client.get("/", headers=AUTH)
    assert response.status == 405 and response.headers["Allow"] == "POST"
    assert (await response.json())["error"]["code"] == INVALID_REQUEST
    response = await client.post("/elsewhere", data="{}", headers=AUTH)
    assert response.status == 404 and response.content_type == "application/json"


async def test_call_without_http(server: RpcServer) -> None:
    assert await server.call("subtract", {"minuend": 5, "subtrahend": 2}) == 3
    with pytest.raises(RpcError) as raised:
        await server.call("nope", [])
    assert raised.value.code == METHOD_NOT_FOUND


def test_registration(server: RpcServer) -> None:
    async def handler() -> None:
        return None

    def blocking() -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        server.method("sum", handler, "again")
    with pytest.raises(ValueError, match="reserved"):
        server.method("rpc.discover", handler, "reserved by JSON-RPC")
    with pytest.raises(TypeError, match="async"):
        server.method("blocking", blocking, "not async")
    help_texts = server.methods()
    assert list(help_texts) == sorted(help_texts)
    assert help_texts["subtract"] == "help for subtract"
    assert "blocking" not in help_texts


@pytest.mark.parametrize("value, size, expected", [
    ("", None, b""),
    ("00ff", None, b"\x00\xff"),
    ("DEADbeef", 4, b"\xde\xad\xbe\xef"),
])
def test_param_hex_accepts(value: str, size: int | None, expected: bytes) -> None:
    assert param_hex(value, "data", size=size) == expected


@pytest.mark.parametrize("value, size, code, message", [
    (12, None, TYPE_ERROR, "data must be a string, not number"),
    ("abc", None, INVALID_PARAMETER, "data must be a hex string"),
    ("de ad", None, INVALID_PARAMETER, "data must be a hex string"),
    ("0x00", None, INVALID_PARAMETER, "data must be a hex string"),
    ("zz", None, INVALID_PARAMETER, "data must be a hex string"),
    ("é1", None, INVALID_PARAMETER, "data must be a hex string"),
    ("00ff", 32, INVALID_PARAMETER, "data must be 32 bytes, got 2"),
])
def test_param_hex_refuses(value, size: int | None, code: int, message: str) -> None:
    with pytest.raises(RpcError) as raised:
        param_hex(value, "data", size=size)
    assert (raised.value.code, raised.value.message) == (code, message)


def test_param_str_and_bool() -> None:
    assert param_str("x", "name") == "x"
    assert param_bool(False, "flag") is False
    for helper, value in [(param_str, None), (param_str, []), (param_bool, 1), (param_bool, "1")]:
        with pytest.raises(RpcError) as raised:
            helper(value, "p")
        assert raised.value.code == TYPE_ERROR and raised.value.message.startswith("p must be")


def test_rpcauth_lines() -> None:
    line, password = make_rpcauth("carol")
    user, rest = line.split(":")
    salt, digest = rest.split("$")
    assert user == "carol" and len(salt) == 32 and len(digest) == 64 and len(password) >= 32
    assert make_rpcauth("carol")[1] != password
    auth = Authenticator(None, [line, make_rpcauth("dave", "pässword")[0]])
    assert auth.check(basic("carol", password))
    assert auth.check(basic("dave", "pässword"))
    assert not auth.check(basic("carol", "pässword"))
    assert not auth.check(basic(COOKIE_USER, password))
    for bad in ["carol", "carol:salt", "carol:salt$abc", ":salt$" + "0" * 64]:
        with pytest.raises(ValueError, match="rpcauth"):
            Authenticator(None, [bad])
    with pytest.raises(ValueError):
        make_rpcauth("a:b")


def test_cookie_file(tmp_path: Path) -> None:
    user, password = write_cookie(tmp_path)
    path = tmp_path / ".cookie"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"{COOKIE_USER}:{password}"
    assert user == COOKIE_USER and len(bytes.fromhex(password)) == 32
    assert read_cookie(tmp_path) == (user, password)
    assert Authenticator(read_cookie(tmp_path), []).check(basic(user, password))
    assert write_cookie(tmp_path)[1] != password
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cookie"]
    remove_cookie(tmp_path)
    remove_cookie(tmp_path)
    with pytest.raises(CookieError, match=f"no cookie at {path}: is the node running"):
        read_cookie(tmp_path)
