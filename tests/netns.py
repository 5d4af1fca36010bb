"""docker/compose.yaml's testnet for real, without a container engine: each service's
command runs as a process in a network namespace of its own, and the namespaces share a
bridge, as containers share compose's network.

As under compose, a node finds the others by service name (a hosts file per namespace,
which `ip netns exec` mounts over /etc/hosts) and uses the same ports as every other
node, each in its own namespace. The bridge has an address of its own, so the caller, in
the root namespace, reaches each node's JSON-RPC at the node's address. Needs root and
iproute2's `ip`.

Test support, so it lives with the tests: docker/ holds the container files, which this
module reads, and no Python; the node's packages never start namespaces. To run the
testnet by hand, as `docker compose up` would: `python -m tests.netns` as root, with
DPODL_RPCAUTH set.
"""

import base64
import contextlib
import ctypes
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from node.cli import build_parser
from node.config import Config, load_config
from node.datadir import LOG_NAME
from tests.compose import Service, load_services

DPODL = str(Path(sys.executable).parent / "dpodl")  # the image's entrypoint
NETNS_ETC = Path("/etc/netns")
# Names made here start with these, then a run's tag: the creator's pid as 6 hex digits
# (pid_max is at most 2**22), so that a later run can tell a dead run's leftovers from a
# live one's, and 2 random ones for runs within one process. Interface names have at most
# 15 characters: "dpb" + 8 for the bridge, "dpv" + 8 + the service's index for a veth.
NETNS_PREFIX, BRIDGE_PREFIX, VETH_PREFIX = "dpodl-", "dpb", "dpv"
SUBNET = "10.231"  # a /24 of this /16 per run; .1 is the bridge, .2 onwards the services
CONSOLE = "console.log"  # a node's stdout and stderr, in its service's directory
STOP_TIMEOUT = 30.0  # compose's stop_grace_period
CALL_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child between fork and exec should not


class NetnsUnavailable(Exception):
    """This machine will not make network namespaces: not root, no `ip`, or refused."""


class NetnsError(Exception):
    """An `ip` command failed."""


class RpcError(Exception):
    """A JSON-RPC call answered with an error."""


class NetnsTestnet:
    """The services as processes in namespaces on one bridge; a context manager that
    tears everything down on the way out, however the body ended."""

    def __init__(self, services: Mapping[str, Service], workdir: Path, *,
                 auth: tuple[str, str] | None = None) -> None:
        self.services = dict(services)
        self.workdir = workdir
        self.auth = auth  # (user, password) for JSON-RPC
        self.tag = f"{os.getpid():06x}{secrets.token_hex(1)}"
        self.bridge = BRIDGE_PREFIX + self.tag
        self.netns = {name: f"{NETNS_PREFIX}{self.tag}-{name}" for name in services}
        self.veth = {name: f"{VETH_PREFIX}{self.tag}{i}" for i, name in enumerate(services)}
        self.ip: dict[str, str] = {}
        self.configs: dict[str, Config] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.links_down: set[str] = set()

    def __enter__(self) -> "NetnsTestnet":
        check_netns()
        remove_stale()
        try:
            self._build_network()
            self._start_nodes()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the network ----------------------------------------------------------------------

    def _build_network(self) -> None:
        names = list(self.services)
        first = self.netns[names[0]]
        try:
            _ip("netns", "add", first)
        except NetnsError as e:  # the one place where a refusal means "cannot"
            raise NetnsUnavailable(str(e)) from None
        subnet = f"{SUBNET}.{_free_subnet()}"
        self.ip = {name: f"{subnet}.{i + 2}" for i, name in enumerate(names)}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # Every service's name, as compose's DNS would answer it; none of the host's names.
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(
            f"{self.ip[name]}\t{name}\n" for name in names)
        for name in names:
            ns = self.netns[name]
            if ns != first:
                _ip("netns", "add", ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            _ip("link", "add", self.veth[name], "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("link", "set", self.veth[name], "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def link_down(self, name: str) -> None:
        """Cut a service off the bridge: its connections stall, as behind a pulled cable."""
        _ip("link", "set", self.veth[name], "down")
        self.links_down.add(name)

    def link_up(self, name: str) -> None:
        _ip("link", "set", self.veth[name], "up")
        self.links_down.discard(name)

    # -- the nodes ------------------------------------------------------------------------

    def _start_nodes(self) -> None:
        for name, service in self.services.items():
            home = self.workdir / name
            mounts = {target: home / source for source, target in service.volumes}
            for path in mounts.values():
                path.mkdir(parents=True, exist_ok=True)
            argv = [_host_path(arg, mounts) for arg in service.command]
            # A container's environment is the image's and the service's; here PATH and a
            # HOME of the node's own stand for the image's, and the caller's DPODL_* stay out.
            env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
                   **dict(service.environment)}
            self.configs[name] = load_config(build_parser().parse_args(argv), env)
            with open(home / CONSOLE, "ab") as console:
                self.procs[name] = subprocess.Popen(
                    ["ip", "netns", "exec", self.netns[name], DPODL, *argv], env=env, cwd=home,
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                    preexec_fn=_end_with_parent)

    def exec(self, name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command in a service's namespace, as `docker compose exec` would."""
        return subprocess.run(["ip", "netns", "exec", self.netns[name], *argv],
                              capture_output=True, text=True, timeout=CALL_TIMEOUT, **kwargs)

    def health(self, name: str) -> tuple[int, dict]:
        """GET /health from the root namespace: (HTTP status, body)."""
        url = f"http://{self.ip[name]}:{self.configs[name].rpc_port}/health"
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as response:
            return response.status, json.loads(response.read())

    def healthcheck(self, name: str) -> subprocess.CompletedProcess:
        """The service's compose health check, run inside its namespace."""
        argv = list(self.services[name].healthcheck)
        if argv[:1] == ["python"]:  # the image's python is the one that runs the node
            argv[0] = sys.executable
        return self.exec(name, argv)

    def call(self, name: str, method: str, *params: object) -> object:
        """A JSON-RPC call, as the rpcauth user: from the root namespace over the bridge,
        or, while the service's link is down, from inside its namespace."""
        if self.procs[name].poll() is not None:  # not worth waiting for: fail at once
            raise RuntimeError(f"{name} exited; see {self.console_path(name)}")
        user, password = self.auth or ("", "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                           "params": list(params)})
        if name in self.links_down:
            done = self.exec(name, [sys.executable, "-I", "-c", _POST, "127.0.0.1",
                                    str(self.configs[name].rpc_port), token], input=body)
            if done.returncode != 0:
                raise OSError(f"{method} on {name}: {done.stderr.strip()}")
            reply = json.loads(done.stdout)
        else:
            reply = _post(self.ip[name], self.configs[name].rpc_port, token, body)
        if reply.get("error"):
            raise RpcError(f"{method} on {name}: {reply['error']}")
        return reply["result"]

    def log_path(self, name: str) -> Path:
        return self.configs[name].datadir / LOG_NAME

    def log(self, name: str) -> str:
        """The node's debug.log."""
        return _read(self.log_path(name))

    def console_path(self, name: str) -> Path:
        """What the node wrote to stdout and stderr: its log, and what Python prints."""
        return self.workdir / name / CONSOLE

    def console(self, name: str) -> str:
        return _read(self.console_path(name))

    # -- teardown -------------------------------------------------------------------------

    def stop(self) -> dict[str, int]:
        """Stop every node as `docker compose stop` does, SIGTERM then after a grace
        period SIGKILL; their exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def close(self) -> None:
        """Stop the nodes; remove the namespaces, what is left in them, their hosts files
        and the bridge. Each step runs whatever the one before did."""
        with contextlib.suppress(Exception):
            self.stop()
        for ns in self.netns.values():
            _remove_netns(ns)
        _run_quietly("ip", "link", "del", self.bridge)


def check_netns() -> None:
    """Raise NetnsUnavailable where this process cannot make namespaces for certain."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (`ip netns add`)")
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise NetnsUnavailable(f"iproute2's `ip` does not run: {e}") from None


def remove_stale() -> None:
    """Remove what runs whose process has died left: their namespaces with what runs in
    them, hosts files and bridges. A live run's are left alone."""
    def dead(name: str, prefix: str) -> bool:
        match = re.fullmatch(rf"{prefix}([0-9a-f]{{6}})[0-9a-f]{{2}}(?:-.*|\d*)", name)
        return bool(match) and not _alive(int(match[1], 16))

    listed = _ip("netns", "list")
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    if NETNS_ETC.is_dir():
        names |= {path.name for path in NETNS_ETC.iterdir()}
    for ns in names:
        if dead(ns, NETNS_PREFIX):
            _remove_netns(ns)
    for line in _ip("-o", "link", "show", "type", "bridge").splitlines():
        bridge = line.split(":")[1].strip()
        if dead(bridge, BRIDGE_PREFIX):
            _run_quietly("ip", "link", "del", bridge)


def _remove_netns(ns: str) -> None:
    # A namespace lives on while a process is in it (a node's miner child, say): `ip netns
    # pids` names only processes this harness started, in namespaces it made.
    pids = _run_quietly("ip", "netns", "pids", ns)
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _run_quietly("ip", "netns", "del", ns)
    hosts = NETNS_ETC / ns / "hosts"
    with contextlib.suppress(FileNotFoundError):
        hosts.unlink()
    with contextlib.suppress(FileNotFoundError, OSError):
        hosts.parent.rmdir()


def _free_subnet() -> int:
    """A third octet for SUBNET that no address or route of this machine uses yet."""
    used = _ip("-4", "addr", "show") + _ip("-4", "route", "show")
    taken = {int(octet) for octet in re.findall(re.escape(SUBNET) + r"\.(\d+)\.", used)}
    free = [octet for octet in range(1, 255) if octet not in taken]
    if not free:
        raise NetnsError(f"every /24 of {SUBNET}.0.0/16 is in use")
    return random.choice(free)


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CALL_TIMEOUT)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _run_quietly(*argv: str) -> str:
    """For teardown: a command whose failure (the thing is gone already) changes nothing."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=CALL_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _end_with_parent() -> None:
    """In the child: have the kernel send SIGTERM should the harness die first (it survives
    `ip netns exec`'s exec), so that a killed test run leaves no node behind."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _host_path(arg: str, mounts: Mapping[str, Path]) -> str:
    """A container path in an argument, mapped to the volume's directory on this machine."""
    for target, path in mounts.items():
        if arg == target or arg.startswith(target.rstrip("/") + "/"):
            return str(path) + arg[len(target):]
    return arg


def _post(host: str, port: int, token: str, body: str) -> dict:
    request = urllib.request.Request(
        f"http://{host}:{port}/", body.encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # JSON-RPC errors come back with 4xx and 5xx too
        raw = e.read()
        if not raw:
            raise
        return json.loads(raw)


# _post, for `python -I -c` inside a namespace: host, port and token as arguments, the
# request's body on stdin, the reply's on stdout.
_POST = """\
import sys, urllib.error, urllib.request
host, port, token = sys.argv[1:]
request = urllib.request.Request(f"http://{host}:{port}/", sys.stdin.buffer.read(),
    headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        sys.stdout.buffer.write(response.read())
except urllib.error.HTTPError as e:
    sys.stdout.buffer.write(e.read())
"""


def main() -> None:
    """Start the testnet as compose would, print where each node answers, and run until
    interrupted."""
    import tempfile

    services = load_services(os.environ)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # tear down on kill, too
    with tempfile.TemporaryDirectory(prefix="dpodl-netns-") as workdir, \
            NetnsTestnet(services, Path(workdir)) as net:
        for name in services:
            print(f"{name}\t{net.netns[name]}\thttp://{net.ip[name]}:"
                  f"{net.configs[name].rpc_port}/\t{net.log_path(name)}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
