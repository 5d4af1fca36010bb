"""A JSON-RPC client for the command line: finds the node as bitcoin-cli does, by its
data directory (the cookie) and its RPC port, or by a configured user and password."""

import base64
import json
import urllib.error
import urllib.request

from consensus.models import Arch, ModelBlob
from node.auth import CookieError, read_cookie
from node.config import Config

TIMEOUT = 60.0  # seconds; `stop` and block submission answer well within it


class RpcClientError(Exception):
    """The call did not give a result: no node, refused credentials, or an RPC error.
    `code` is the RPC error's code, None when no node answered the call."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def call(config: Config, method: str, params: list, *,
         credentials: tuple[str, str] | None = None, timeout: float = TIMEOUT) -> object:
    """Call `method` on the node `config` describes and return its result."""
    host = "127.0.0.1" if config.rpc_bind in ("0.0.0.0", "::", "") else config.rpc_bind
    url = f"http://{host}:{config.rpc_port}/"
    if credentials is None:
        try:
            credentials = read_cookie(config.datadir)
        except CookieError as e:
            raise RpcClientError(str(e)) from None
    token = base64.b64encode(":".join(credentials).encode()).decode()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    request = urllib.request.Request(url, body.encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise RpcClientError(f"the node at {url} refused the credentials "
                                 "(wrong user or password, or a stale cookie)") from None
        raise RpcClientError(f"the node at {url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RpcClientError(f"could not connect to the node at {url} ({reason}): is it "
                             f"running, with data directory {config.datadir}?") from None
    except ValueError:
        raise RpcClientError(f"the node at {url} answered something that is not JSON") from None
    error = reply.get("error")
    if error:
        raise RpcClientError(f"error code {error.get('code')}: {error.get('message')}",
                             error.get("code"))
    return reply.get("result")


def model_blob(model: dict) -> ModelBlob:
    """The model a `getmodel MODEL_ID true` reply carries (KeyError without weights)."""
    arch = Arch(**{**model["architecture"], "widths": tuple(model["architecture"]["widths"])})
    return ModelBlob(arch, bytes.fromhex(model["weights"]))
