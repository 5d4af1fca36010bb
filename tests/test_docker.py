"""The container testnet as compose resolves it, and each node's command as the CLI parses
it. No container runs: `docker-compose config` validates the file, and the commands go
through the same parser and configuration loader that `dpodl node` uses."""

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from node.auth import make_rpcauth
from node.cli import build_parser
from node.config import Config, ConfigError, load_config
from tests.compose import load_services

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
RPCAUTH, _ = make_rpcauth("testnet")
# "127.0.0.1:18601:18443/tcp", as compose v1 writes a `ports` entry.
_PORT = re.compile(r"(?:(?P<host_ip>[0-9.]+):)?(?P<published>\d+):(?P<target>\d+)(?:/tcp)?")


def node_config(argv: list[str], environ: Mapping[str, str]) -> Config:
    """The Config that `argv` (entrypoint and command) starts a node with. SystemExit where
    the CLI's parser refuses the arguments, ConfigError where the node would."""
    args = build_parser().parse_args(argv[1:])
    if argv[0] != "dpodl" or args.command != "node":
        raise ConfigError(f"not a `dpodl node` command: {argv}")
    return load_config(args, environ)


def compose_config(environ: Mapping[str, str]) -> subprocess.CompletedProcess:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed; install it (Debian: apt-get install "
                    "docker-compose), as the README's test command does")
    # Only the variables given here: a DPODL_* or COMPOSE_* of the caller's must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPODL_", "COMPOSE_"))}
    return subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], cwd=REPO,
                          env=env | dict(environ), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """compose.yaml as compose resolves it, with the credentials variable set."""
    result = compose_config({"DPODL_RPCAUTH": RPCAUTH})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def dockerfile() -> dict:
    return _dockerfile()


@pytest.fixture(scope="module")
def configs(resolved: dict, dockerfile: dict) -> dict[str, Config]:
    """Each service's node configuration, from the image's entrypoint, the service's command
    and its environment. Not the image's ENV: a command must hold all a node needs, so that
    it runs the same as a plain process."""
    configs = {}
    for name, service in resolved["services"].items():
        argv = dockerfile["ENTRYPOINT"] + service["command"]
        try:
            configs[name] = node_config(argv, _environment(service))
        except (SystemExit, ConfigError) as e:  # argparse has printed its reason
            pytest.fail(f"service {name}: the node refuses its command {argv}: {e}")
    return configs


def test_compose_resolves_four_nodes_of_which_two_mine(resolved, configs):
    assert len(resolved["services"]) == 4
    miners = [name for name, config in configs.items() if config.mine]
    assert len(miners) == 2 and all("--mine" in resolved["services"][m]["command"]
                                    for m in miners)


def test_every_node_has_a_named_volume_of_its_own_at_its_datadir(resolved, configs):
    sources = []
    for name, service in resolved["services"].items():
        (mount,) = [_volume(v) for v in service["volumes"]]
        source, target = mount
        assert source in resolved["volumes"], f"{name}: {source} is not a named volume"
        assert Path(target) == configs[name].datadir
        sources.append(source)
    assert len(set(sources)) == len(sources)


def test_rpc_is_published_on_loopback_only_and_health_checked(resolved, configs):
    published = []
    for name, service in resolved["services"].items():
        config = configs[name]
        (port,) = [_port(p) for p in service["ports"]]
        host_ip, host_port, target = port
        assert (host_ip, target) == ("127.0.0.1", config.rpc_port), name
        # Inside its container the node must listen beyond loopback, or the port mapping
        # reaches nothing.
        assert config.rpc_bind == "0.0.0.0", name
        published.append(host_port)
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python", name
        assert f"urlopen('http://127.0.0.1:{config.rpc_port}/health'" in test[-1], name
    assert len(set(published)) == len(published)


def test_compose_refuses_to_start_without_credentials():
    result = compose_config({})
    assert result.returncode != 0 and "DPODL_RPCAUTH" in result.stderr


def test_every_command_is_one_the_node_accepts(resolved, configs):
    services = resolved["services"]
    for name, config in configs.items():
        assert "entrypoint" not in services[name]  # the image's `dpodl` runs the command
        assert config.network == "dev" and config.rpc_auth == (RPCAUTH,)
        for host, port in config.peers:  # a peer is another service, at its P2P port
            assert host in services and host != name and port == configs[host].p2p_port


def test_the_nodes_form_one_network(configs):
    linked = {name: {host for host, _ in config.peers} for name, config in configs.items()}
    reached, todo = set(), [next(iter(configs))]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [other for other in configs if other in linked[name] or name in linked[other]]
    assert reached == set(configs)


def test_the_netns_harness_reads_the_file_as_compose_does(resolved):
    # tests/netns.py runs the services as tests/compose.py reads them, without compose.
    services = load_services({"DPODL_RPCAUTH": RPCAUTH})
    assert services.keys() == resolved["services"].keys()
    for name, service in services.items():
        theirs = resolved["services"][name]
        assert list(service.command) == theirs["command"], name
        assert dict(service.environment) == _environment(theirs), name
        assert list(service.volumes) == [_volume(v) for v in theirs["volumes"]], name
        assert ["CMD", *service.healthcheck] == theirs["healthcheck"]["test"], name


BASE = ["dpodl", "node", "--network", "dev", "--datadir", "/data", "--rpc-bind", "0.0.0.0"]


@pytest.mark.parametrize(("extra", "environ", "error"), [
    (["--peers", "miner1:18444"], {}, SystemExit),        # no such flag
    (["--mine", "yes"], {}, SystemExit),                  # a switch takes no value
    (["--peer", "miner1"], {}, ConfigError),               # no port
    (["--peer", "[miner1]:18444"], {}, ConfigError),       # brackets hold IPv6 only
    (["--rpc-port", "99999"], {}, ConfigError),
    (["--network", "mainnet"], {}, ConfigError),
    ([], {"DPODL_RPCAUTH": "testnet:password"}, ConfigError),  # a password, not its hash
])
def test_a_broken_command_is_refused(extra, environ, error):
    assert node_config(BASE, {"DPODL_RPCAUTH": RPCAUTH}).rpc_auth == (RPCAUTH,)
    with pytest.raises(error):
        node_config(BASE + extra, {"DPODL_RPCAUTH": RPCAUTH} | environ)


def test_only_a_node_command_is_accepted():
    with pytest.raises(ConfigError, match="not a `dpodl node` command"):
        node_config(["dpodl", "genesis"], {})


def test_dockerfile_agrees_with_compose(resolved, configs, dockerfile):
    assert dockerfile["ENTRYPOINT"] == ["dpodl"] and dockerfile["CMD"][0] == "node"
    assert dockerfile["USER"] != "root"
    for name, service in resolved["services"].items():
        build = service["build"]
        assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE, name
        config = configs[name]
        assert dockerfile["EXPOSE"] == {config.rpc_port, config.p2p_port}, name
        assert Path(dockerfile["VOLUME"]) == config.datadir, name


def _dockerfile() -> dict:
    """The Dockerfile's ENTRYPOINT and CMD (exec form), EXPOSE'd ports, USER and VOLUME."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction in ("ENTRYPOINT", "CMD"):
            found[instruction] = json.loads(rest)  # the exec form: shell form fails here
        elif instruction == "EXPOSE":
            found["EXPOSE"] = {int(port.removesuffix("/tcp")) for port in rest.split()}
        elif instruction in ("USER", "VOLUME"):
            found[instruction] = rest.strip()
    return found


def _environment(service: dict) -> dict[str, str]:
    # compose writes a resolved "$" as "$$", ready to be read back as a compose file.
    return {k: v.replace("$$", "$") for k, v in service.get("environment", {}).items()}


def _port(entry: str | dict) -> tuple[str, int, int]:
    """(host address, host port, container port) of a resolved `ports` entry."""
    if isinstance(entry, dict):  # compose v2 writes the long syntax
        return entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])
    match = _PORT.fullmatch(entry)
    assert match, f"unexpected ports entry {entry!r}"
    return match["host_ip"] or "", int(match["published"]), int(match["target"])


def _volume(entry: str | dict) -> tuple[str, str]:
    """(source, target) of a resolved `volumes` entry."""
    if isinstance(entry, dict):  # compose v2 writes the long syntax
        assert entry["type"] == "volume", entry
        return entry["source"], entry["target"]
    source, target, *_ = entry.split(":")
    return source, target
