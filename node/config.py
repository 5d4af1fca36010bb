"""The node's configuration, built once at start-up into a frozen Config.

Sources, lowest precedence first:

1. defaults per network (the ports are the network's own, from consensus/params.py);
2. `dpodl.toml` in the data directory, with the keys network, rpc_bind, rpc_port,
   p2p_bind, p2p_port, listen, peers (a list of "HOST:PORT"), mine, miner_key, device,
   datasets, rpcauth (a list of rpcauth lines), log_level, keep_checkpoints and
   verify_workers;
3. environment variables DPODL_<KEY> (DPODL_RPC_PORT, DPODL_RPCAUTH, ...) and
   DPODL_DATADIR: lists (DPODL_PEERS, DPODL_RPCAUTH) are comma-separated, DPODL_MINE and
   DPODL_LISTEN are 1/0/true/false/yes/no, and a variable set to "" counts as unset;
4. command-line flags (add_node_arguments).

The file lives in the data directory, and the default data directory depends on the
network, so these two come first: the network from flag or environment, then the data
directory from flag, environment or default_datadir(network), then the file, which may
name the network only to agree. A --datadir is used as given, with no per-network
subdirectory appended (as Bitcoin Core does for testnet3): one directory holds one
network's chain, and the file and the chain store both refuse another network.

Relative paths in the file are relative to the data directory; from flags and the
environment, to the working directory. Any bad value raises ConfigError naming its
source, and no Config is built.
"""

import argparse
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from consensus.params import NETWORKS
from node.datadir import CONFIG_NAME
from node.logs import LOG_LEVELS

DEFAULT_NETWORK = "dev"
DEVICES = ("cpu", "cuda")
# Blocks whose checkpoints a node keeps (storage/retention.py). 32 blocks span a reorg far
# deeper than the fork rule makes in practice and let a node that was away for 32 blocks
# (under 3 minutes on dev, about half an hour on testnet) audit what it missed from any
# relay after the miner has gone. The price is disk: at most s_max/k + 1 checkpoints of
# 8 bytes a parameter per proof, at most about 1.5 MB per proof on dev and 220 MB on
# testnet (a few GB for the window there, as most proofs stop well short of s_max). 0 is
# refused: it would drop a block's checkpoints as the block connects, before its auditors
# have fetched them. A node that wants them all gives a large number.
DEFAULT_KEEP_CHECKPOINTS = 32
# Processes that replay audits (mining/replay.py): a core for each but one, which the
# event loop, the chain thread and the miner share; at least one, and no more than 8
# (a proof has at most 2 + q_local audits to run side by side, and each worker holds
# torch and the dataset in memory). 0 replays on the chain thread.
DEFAULT_VERIFY_WORKERS = max(1, min(8, (os.cpu_count() or 1) - 1))
MAX_VERIFY_WORKERS = 64

# A host name or IPv4 address; IPv6 addresses are checked by ipaddress instead.
_HOST = re.compile(r"[A-Za-z0-9.-]+")
_PEER = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")
# Bitcoin Core's share/rpcauth/rpcauth.py output: user:salt$hmac, salt and the
# HMAC-SHA256 of the password in hex; the password itself is never stored.
_RPCAUTH = re.compile(r"[^:$\s]+:[0-9a-fA-F]+\$[0-9a-fA-F]{64}")
_COUNTS = {"keep_checkpoints": "blocks", "verify_workers": "processes"}  # what they count
_MINE_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}

_FILE_KEYS = ("network", "rpc_bind", "rpc_port", "p2p_bind", "p2p_port", "listen", "peers",
              "mine", "miner_key", "device", "datasets", "rpcauth", "log_level",
              "keep_checkpoints", "verify_workers")
_FLAGS = {"network": "--network", "datadir": "--datadir", "rpc_bind": "--rpc-bind",
          "rpc_port": "--rpc-port", "p2p_bind": "--p2p-bind", "p2p_port": "--p2p-port",
          "listen": "--listen", "peers": "--peer",
          "mine": "--mine", "miner_key": "--miner-key", "device": "--device",
          "datasets": "--datasets", "log_level": "--log-level",
          "keep_checkpoints": "--keep-checkpoints", "verify_workers": "--verify-workers"}

# Option name -> (value, where it came from: a flag, a variable, or "FILE: key").
_Given = dict[str, tuple[object, str]]


class ConfigError(Exception):
    """A configuration value is wrong; the message names its source and the reason."""


@dataclass(frozen=True, slots=True)
class Config:
    network: str
    datadir: Path
    rpc_bind: str
    rpc_port: int
    p2p_bind: str
    p2p_port: int
    listen: bool  # accept P2P connections (we dial out either way)
    peers: tuple[tuple[str, int], ...]
    mine: bool
    miner_key: Path | None  # None: the data directory's own key
    device: str
    datasets: Path | None  # None: only the embedded digits
    rpc_auth: tuple[str, ...]
    log_level: str
    # Defaulted, unlike the rest, so that a Config built by hand (tests) need not name it.
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS
    # Hand-built Configs replay on the chain thread: a test's in-process nodes start no
    # worker processes. load_config defaults to DEFAULT_VERIFY_WORKERS.
    verify_workers: int = 0


def default_datadir(network: str) -> Path:
    """~/.dpodl/<network>: every network in its own directory, none being the main one."""
    return Path.home() / ".dpodl" / network


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the node's flags; each defaults to None, "not given", so that it can lose to
    the environment and the file."""
    add = parser.add_argument
    add("--network", metavar="{" + ",".join(NETWORKS) + "}",
        help=f"the chain to follow (default {DEFAULT_NETWORK})")
    add("--datadir", metavar="DIR", help="data directory (default ~/.dpodl/NETWORK)")
    add("--rpc-bind", metavar="ADDR", help="JSON-RPC listening address (default 127.0.0.1)")
    add("--rpc-port", metavar="PORT", help="JSON-RPC port (default: the network's)")
    add("--p2p-bind", metavar="ADDR", help="P2P listening address (default 0.0.0.0)")
    add("--p2p-port", metavar="PORT", help="P2P listening port (default: the network's)")
    add("--listen", action=argparse.BooleanOptionalAction,
        help="accept P2P connections (default yes)")
    add("--peer", dest="peers", action="append", metavar="HOST:PORT",
        help="connect to this peer; repeatable; IPv6 as [::1]:PORT")
    add("--mine", action=argparse.BooleanOptionalAction, help="mine blocks (default no)")
    add("--miner-key", metavar="FILE", help="the miner's key file (default DIR/keys/miner.key)")
    add("--device", metavar="{" + ",".join(DEVICES) + "}", help="where to train (default cpu)")
    add("--datasets", metavar="DIR",
        help="where MNIST and other datasets live (default: only the embedded digits)")
    add("--log-level", metavar="{" + ",".join(LOG_LEVELS) + "}", help="default info")
    add("--keep-checkpoints", metavar="N",
        help=f"keep the checkpoints of the last N blocks, at least 1 "
             f"(default {DEFAULT_KEEP_CHECKPOINTS})")
    add("--verify-workers", metavar="N",
        help=f"processes that replay audited training; 0 replays on the chain thread "
             f"(default {DEFAULT_VERIFY_WORKERS} here: the cores but one, 1 to 8)")


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Build the Config from defaults, the data directory's file, `environ` and `args`."""
    cwd = Path.cwd()
    flags = _parse(_from_flags(args), cwd)
    env = _parse(_from_env(environ), cwd)
    overrides = env | flags
    datadir = overrides.pop("datadir", None) or default_datadir(
        overrides.get("network", DEFAULT_NETWORK))
    config_path = datadir / CONFIG_NAME
    file = _parse(_from_file(config_path), datadir)
    network, file_network = overrides.get("network"), file.get("network")
    if network and file_network and file_network != network:
        source = "--network" if "network" in flags else "DPODL_NETWORK"
        raise ConfigError(f"{config_path}: network: the file is for {file_network!r} "
                          f"but {source} says {network!r}")
    network = network or file_network or DEFAULT_NETWORK
    params = NETWORKS[network]
    defaults = {"network": network, "rpc_bind": "127.0.0.1", "rpc_port": params.rpc_port,
                "p2p_bind": "0.0.0.0", "p2p_port": params.p2p_port, "listen": True,
                "peers": (), "mine": False, "miner_key": None,
                "device": "cpu", "datasets": None, "rpcauth": (), "log_level": "info",
                "keep_checkpoints": DEFAULT_KEEP_CHECKPOINTS,
                "verify_workers": DEFAULT_VERIFY_WORKERS}
    values = defaults | file | overrides
    return Config(datadir=datadir, rpc_auth=values.pop("rpcauth"), **values)


def _from_flags(args: argparse.Namespace) -> _Given:
    given: _Given = {}
    for option, flag in _FLAGS.items():
        value = getattr(args, option, None)
        if value is not None:
            given[option] = (_from_text(option, value, flag) if isinstance(value, str)
                             else value, flag)
    return given


def _from_env(environ: Mapping[str, str]) -> _Given:
    given: _Given = {}
    for option in ("datadir", *_FILE_KEYS):
        name = f"DPODL_{option.upper()}"
        if text := environ.get(name, ""):
            given[option] = (_from_text(option, text, name), name)
    return given


def _from_file(path: Path) -> _Given:
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:  # its message gives the line and column
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if unknown := sorted(set(table) - set(_FILE_KEYS)):
        raise ConfigError(f"{path}: unknown key {', '.join(unknown)} "
                          f"(known: {', '.join(_FILE_KEYS)})")
    return {key: (value, f"{path}: {key}") for key, value in table.items()}


def _from_text(option: str, text: str, where: str) -> object:
    """A flag's or variable's text in the shape the TOML file would give it."""
    if option in ("rpc_port", "p2p_port"):
        if not text.isascii() or not text.isdigit():
            raise ConfigError(f"{where}: {text!r} is not a port number")
        return int(text)
    if option in _COUNTS:
        if not text.isascii() or not text.isdigit():
            raise ConfigError(f"{where}: {text!r} is not a number of {_COUNTS[option]}")
        return int(text)
    if option in ("mine", "listen"):
        if text.lower() not in _MINE_WORDS:
            raise ConfigError(f"{where}: {text!r} is not one of {'/'.join(_MINE_WORDS)}")
        return _MINE_WORDS[text.lower()]
    if option in ("peers", "rpcauth"):
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _parse(given: _Given, base: Path) -> dict[str, object]:
    """Check and convert every value; relative paths become relative to `base`."""
    values: dict[str, object] = {}
    for option, (value, where) in given.items():
        converted = _CONVERT[option](value, where)
        values[option] = base / converted if isinstance(converted, Path) else converted
    return values


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def convert(value: object, where: str) -> str:
        text = _text(value, where)
        if text not in choices:
            raise ConfigError(f"{where}: {text!r} is not one of {', '.join(choices)}")
        return text
    return convert


def _port(value: object, where: str) -> int:
    if type(value) is not int:  # not isinstance: True is an int too
        raise ConfigError(f"{where}: expected a port number, got {value!r}")
    if not 1 <= value <= 65535:
        raise ConfigError(f"{where}: port {value} is out of range 1-65535")
    return value


def _block_count(value: object, where: str) -> int:
    if type(value) is not int:  # not isinstance: True is an int too
        raise ConfigError(f"{where}: expected a number of blocks, got {value!r}")
    if value < 1:
        raise ConfigError(f"{where}: {value} blocks is too few, the least is 1")
    return value


def _worker_count(value: object, where: str) -> int:
    if type(value) is not int:
        raise ConfigError(f"{where}: expected a number of processes, got {value!r}")
    if not 0 <= value <= MAX_VERIFY_WORKERS:
        raise ConfigError(f"{where}: {value} workers is out of range 0-{MAX_VERIFY_WORKERS}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _path(value: object, where: str) -> Path:
    return Path(_text(value, where)).expanduser()


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _bind(value: object, where: str) -> str:
    text = _text(value, where)
    if not (_HOST.fullmatch(text) or _is_ipv6(text)):
        raise ConfigError(f"{where}: {text!r} is not a host name or IP address")
    return text


def parse_peer(value: object, where: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT), as --peer and addnode take it."""
    text = _text(value, where)
    match = _PEER.fullmatch(text)
    if not match or (match["ipv6"] is not None and not _is_ipv6(match["ipv6"])):
        raise ConfigError(f"{where}: {text!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    return match["ipv6"] or match["host"], _port(int(match["port"]), f"{where}: {text!r}")


def _rpcauth(value: object, where: str) -> str:
    text = _text(value, where)
    if not _RPCAUTH.fullmatch(text):
        raise ConfigError(f"{where}: {text!r} is not an rpcauth line, USER:SALT$HMAC "
                          "(hex salt, 64 hex digits of HMAC-SHA256)")
    return text


def _list(item: Callable[[object, str], object]) -> Callable[[object, str], tuple]:
    def convert(value: object, where: str) -> tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(item(element, where) for element in value)
    return convert


_CONVERT: dict[str, Callable[[object, str], object]] = {
    "network": _choice(tuple(NETWORKS)),
    "datadir": _path,
    "rpc_bind": _bind,
    "rpc_port": _port,
    "p2p_bind": _bind,
    "p2p_port": _port,
    "listen": _bool,
    "peers": _list(parse_peer),
    "mine": _bool,
    "miner_key": _path,
    "device": _choice(DEVICES),
    "datasets": _path,
    "rpcauth": _list(_rpcauth),
    "log_level": _choice(LOG_LEVELS),
    "keep_checkpoints": _block_count,
    "verify_workers": _worker_count,
}
