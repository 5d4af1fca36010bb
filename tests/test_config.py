"""The node's configuration: defaults < dpodl.toml < DPODL_* < flags, and clear errors."""

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from consensus.params import DEV, TESTNET
from node.config import (
    DEFAULT_VERIFY_WORKERS,
    Config,
    ConfigError,
    add_node_arguments,
    default_datadir,
    load_config,
)

AUTH1 = "alice:0123456789abcdef0123456789abcdef$" + "a" * 64
AUTH2 = "bob:ff$" + "0123456789ABCDEF" * 4


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh home and working directory, so defaults and relative paths land in tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture
def datadir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return parser.parse_args(argv)


def load(datadir: Path, *argv: str, env: dict[str, str] | None = None,
         file: str | None = None) -> Config:
    if file is not None:
        (datadir / "dpodl.toml").write_text(file)
    return load_config(parse("--datadir", str(datadir), *argv), env or {})


def test_every_flag_defaults_to_not_given():
    assert all(value is None for value in vars(parse()).values())
    assert set(vars(parse())) == {"network", "datadir", "rpc_bind", "rpc_port", "p2p_bind",
                                  "p2p_port", "listen", "peers", "mine", "miner_key", "device",
                                  "datasets", "log_level", "keep_checkpoints",
                                  "verify_workers"}


def test_defaults_for_dev(home):
    config = load_config(argparse.Namespace(), {})
    assert config == Config(
        network="dev", datadir=home / ".dpodl" / "dev", rpc_bind="127.0.0.1",
        rpc_port=DEV.rpc_port, p2p_bind="0.0.0.0", p2p_port=DEV.p2p_port, listen=True, peers=(),
        mine=False, miner_key=None,
        device="cpu", datasets=None, rpc_auth=(), log_level="info",
        verify_workers=DEFAULT_VERIFY_WORKERS)
    assert 1 <= DEFAULT_VERIFY_WORKERS <= 8
    assert config.datadir == default_datadir("dev")
    assert not config.datadir.exists()  # loading reads, never creates


def test_network_from_environment_picks_its_datadir_and_ports(home):
    config = load_config(parse(), {"DPODL_NETWORK": "testnet"})
    assert config.network == "testnet"
    assert config.datadir == home / ".dpodl" / "testnet"
    assert (config.rpc_port, config.p2p_port) == (TESTNET.rpc_port, TESTNET.p2p_port)


def test_network_flag_beats_environment(home):
    config = load_config(parse("--network", "dev"), {"DPODL_NETWORK": "testnet"})
    assert (config.network, config.datadir) == ("dev", home / ".dpodl" / "dev")


def test_file_in_the_default_datadir_of_the_chosen_network_is_read(home):
    (home / ".dpodl" / "testnet").mkdir(parents=True)
    (home / ".dpodl" / "testnet" / "dpodl.toml").write_text("rpc_port = 5000\n")
    config = load_config(parse("--network", "testnet"), {})
    assert (config.network, config.rpc_port) == ("testnet", 5000)


def test_file_alone_may_choose_the_network(datadir):
    config = load(datadir, file='network = "testnet"\n')
    assert config.network == "testnet"
    assert (config.rpc_port, config.p2p_port) == (TESTNET.rpc_port, TESTNET.p2p_port)


@pytest.mark.parametrize(("argv", "env", "source"), [
    (("--network", "dev"), {}, "--network"),
    ((), {"DPODL_NETWORK": "dev"}, "DPODL_NETWORK"),
])
def test_file_for_another_network_is_refused(datadir, argv, env, source):
    with pytest.raises(ConfigError) as err:
        load(datadir, *argv, env=env, file='network = "testnet"\n')
    assert str(err.value) == (f"{datadir / 'dpodl.toml'}: network: the file is for 'testnet' "
                              f"but {source} says 'dev'")


def test_datadir_precedence(tmp_path, home):
    assert load_config(parse(), {}).datadir == home / ".dpodl" / "dev"
    env = {"DPODL_DATADIR": str(tmp_path / "from-env")}
    assert load_config(parse(), env).datadir == tmp_path / "from-env"
    flags = parse("--datadir", str(tmp_path / "from-flag"))
    assert load_config(flags, env).datadir == tmp_path / "from-flag"


def test_relative_datadir_is_relative_to_the_working_directory(tmp_path):
    assert load_config(parse("--datadir", "rel"), {}).datadir == tmp_path / "rel"
    assert load_config(parse(), {"DPODL_DATADIR": "rel2"}).datadir == tmp_path / "rel2"


# field, default, (file line, value), (variable, text, value), (flags, value): each source
# differs from the one below it, so every step shows the higher one winning.
PRECEDENCE = [
    ("rpc_bind", "127.0.0.1", ('rpc_bind = "10.0.0.1"', "10.0.0.1"),
     ("DPODL_RPC_BIND", "::", "::"), (["--rpc-bind", "localhost"], "localhost")),
    ("rpc_port", DEV.rpc_port, ("rpc_port = 1001", 1001),
     ("DPODL_RPC_PORT", "1002", 1002), (["--rpc-port", "1003"], 1003)),
    ("p2p_bind", "0.0.0.0", ('p2p_bind = "10.0.0.1"', "10.0.0.1"),
     ("DPODL_P2P_BIND", "::", "::"), (["--p2p-bind", "127.0.0.1"], "127.0.0.1")),
    ("listen", True, ("listen = false", False), ("DPODL_LISTEN", "yes", True),
     (["--no-listen"], False)),
    ("p2p_port", DEV.p2p_port, ("p2p_port = 2001", 2001),
     ("DPODL_P2P_PORT", "2002", 2002), (["--p2p-port", "2003"], 2003)),
    ("peers", (), ('peers = ["a.example:1", "[::1]:2"]', (("a.example", 1), ("::1", 2))),
     ("DPODL_PEERS", " b:3, 10.0.0.4:4,", (("b", 3), ("10.0.0.4", 4))),
     (["--peer", "c:5", "--peer", "[fe80::1]:6"], (("c", 5), ("fe80::1", 6)))),
    ("mine", False, ("mine = true", True), ("DPODL_MINE", "no", False), (["--mine"], True)),
    ("miner_key", None, ('miner_key = "/k/file"', Path("/k/file")),
     ("DPODL_MINER_KEY", "/k/env", Path("/k/env")), (["--miner-key", "/k/flag"], Path("/k/flag"))),
    ("device", "cpu", ('device = "cuda"', "cuda"), ("DPODL_DEVICE", "cpu", "cpu"),
     (["--device", "cuda"], "cuda")),
    ("datasets", None, ('datasets = "/d/file"', Path("/d/file")),
     ("DPODL_DATASETS", "/d/env", Path("/d/env")), (["--datasets", "/d/flag"], Path("/d/flag"))),
    ("rpc_auth", (), (f'rpcauth = ["{AUTH1}"]', (AUTH1,)),
     ("DPODL_RPCAUTH", f"{AUTH2},{AUTH1}", (AUTH2, AUTH1)), None),  # no flag: keep secrets off ps
    ("log_level", "info", ('log_level = "debug"', "debug"),
     ("DPODL_LOG_LEVEL", "warning", "warning"), (["--log-level", "error"], "error")),
]


@pytest.mark.parametrize(("field", "default", "file", "env", "flag"), PRECEDENCE,
                         ids=[row[0] for row in PRECEDENCE])
def test_precedence(datadir, field, default, file, env, flag):
    assert getattr(load(datadir), field) == default
    assert getattr(load(datadir, file=file[0] + "\n"), field) == file[1]
    environ = {env[0]: env[1]}
    assert getattr(load(datadir, env=environ), field) == env[2]
    if flag is not None:
        assert getattr(load(datadir, *flag[0], env=environ), field) == flag[1]


def test_no_mine_flag_overrides_file_and_environment(datadir):
    assert load(datadir, "--no-mine", env={"DPODL_MINE": "1"}, file="mine = true\n").mine is False


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("TRUE", True), ("yes", True), ("0", False), ("false", False), ("No", False)])
def test_mine_words(datadir, text, value):
    assert load(datadir, env={"DPODL_MINE": text}).mine is value


def test_empty_variable_counts_as_unset(datadir):
    config = load(datadir, env={"DPODL_RPC_PORT": "", "DPODL_PEERS": ""},
                  file='rpc_port = 7000\npeers = ["a:1"]\n')
    assert (config.rpc_port, config.peers) == (7000, (("a", 1),))


def test_relative_paths(tmp_path, datadir, home):
    file = 'miner_key = "keys/other.key"\ndatasets = "sets"\n'
    config = load(datadir, file=file)
    assert (config.miner_key, config.datasets) == (datadir / "keys/other.key", datadir / "sets")
    config = load(datadir, "--miner-key", "my.key", env={"DPODL_DATASETS": "mnist"}, file=file)
    assert (config.miner_key, config.datasets) == (tmp_path / "my.key", tmp_path / "mnist")
    assert load(datadir, "--datasets", "~/sets").datasets == home / "sets"


@pytest.mark.parametrize("peer", [
    "host", "host:", ":80", "host:port", "::1:80", "[::1]", "[::1]80", "[nothex]:80",
    "a b:80", "host/x:80", "[::1]:1:2"])
def test_malformed_peer(datadir, peer):
    with pytest.raises(ConfigError) as err:
        load(datadir, "--peer", "ok:1", "--peer", peer)
    assert str(err.value) == f"--peer: {peer!r} is not HOST:PORT (IPv6 as [::1]:PORT)"


@pytest.mark.parametrize("peer", ["host:0", "[::1]:65536", "h:99999"])
def test_peer_port_out_of_range(datadir, peer):
    with pytest.raises(ConfigError, match=r"^--peer: .*: port \d+ is out of range 1-65535$"):
        load(datadir, "--peer", peer)


# (file, environment, flags) -> where the message must say the problem is, and why.
FILE_ERRORS = [
    ("rpc_port = 70000", "rpc_port", "port 70000 is out of range 1-65535"),
    ("p2p_port = 0", "p2p_port", "port 0 is out of range 1-65535"),
    ('rpc_port = "8332"', "rpc_port", "expected a port number, got '8332'"),
    ("rpc_port = true", "rpc_port", "expected a port number, got True"),
    ('mine = "yes"', "mine", "expected true or false, got 'yes'"),
    ('peers = "a:1"', "peers", "expected a list, got 'a:1'"),
    ("peers = [1]", "peers", "expected a non-empty string, got 1"),
    ('peers = ["a"]', "peers", "'a' is not HOST:PORT"),
    ('device = "tpu"', "device", "'tpu' is not one of cpu, cuda"),
    ('network = "mainnet"', "network", "'mainnet' is not one of dev, dev-accuracy, testnet"),
    ('log_level = "trace"', "log_level", "'trace' is not one of debug, info, warning, error"),
    ('rpc_bind = "a b"', "rpc_bind", "'a b' is not a host name or IP address"),
    ('miner_key = ""', "miner_key", "expected a non-empty string, got ''"),
    ("datasets = 3", "datasets", "expected a non-empty string, got 3"),
    ('rpcauth = ["alice:secret"]', "rpcauth", "'alice:secret' is not an rpcauth line"),
    (f'rpcauth = "{AUTH1}"', "rpcauth", "expected a list"),
]


@pytest.mark.parametrize(("file", "key", "reason"), FILE_ERRORS,
                         ids=[row[0] for row in FILE_ERRORS])
def test_bad_file_value(datadir, file, key, reason):
    with pytest.raises(ConfigError) as err:
        load(datadir, file=file + "\n")
    assert str(err.value).startswith(f"{datadir / 'dpodl.toml'}: {key}: {reason}")


def test_unknown_file_keys_are_named(datadir):
    with pytest.raises(ConfigError, match=r"dpodl\.toml: unknown key colour, datadir \(known: "):
        load(datadir, file='datadir = "/x"\ncolour = "blue"\n')


def test_malformed_toml_names_the_line(datadir):
    with pytest.raises(ConfigError) as err:
        load(datadir, file="mine = true\nrpc_port = = 3\n")
    assert str(err.value).startswith(f"{datadir / 'dpodl.toml'}: not valid TOML: ")
    assert "line 2" in str(err.value)


def test_unreadable_file(datadir):
    (datadir / "dpodl.toml").mkdir()
    with pytest.raises(ConfigError, match=r"dpodl\.toml: cannot read it: Is a directory"):
        load(datadir)


ENV_ERRORS = [
    ("DPODL_RPC_PORT", "abc", "'abc' is not a port number"),
    ("DPODL_RPC_PORT", "-1", "'-1' is not a port number"),
    ("DPODL_P2P_PORT", "0", "port 0 is out of range 1-65535"),
    ("DPODL_MINE", "maybe", "'maybe' is not one of 1/true/yes/0/false/no"),
    ("DPODL_PEERS", "a:1,::1:2", "'::1:2' is not HOST:PORT"),
    ("DPODL_NETWORK", "main", "'main' is not one of dev, dev-accuracy, testnet"),
    ("DPODL_DEVICE", "gpu", "'gpu' is not one of cpu, cuda"),
    ("DPODL_LOG_LEVEL", "loud", "'loud' is not one of debug"),
    ("DPODL_RPCAUTH", "bob:salt$" + "0" * 64, "'bob:salt$" + "0" * 64 + "' is not an rpcauth"),
    ("DPODL_RPCAUTH", "bob:ff$" + "0" * 63, "is not an rpcauth line"),
]


@pytest.mark.parametrize(("name", "text", "reason"), ENV_ERRORS)
def test_bad_environment_value(datadir, name, text, reason):
    with pytest.raises(ConfigError) as err:
        load(datadir, env={name: text})
    assert str(err.value).startswith(f"{name}: ")
    assert reason in str(err.value)


FLAG_ERRORS = [
    (["--rpc-port", "65536"], "--rpc-port: port 65536 is out of range 1-65535"),
    (["--p2p-port", "x"], "--p2p-port: 'x' is not a port number"),
    (["--network", "x"], "--network: 'x' is not one of dev, dev-accuracy, testnet"),
    (["--device", "gpu"], "--device: 'gpu' is not one of cpu, cuda"),
    (["--log-level", "loud"], "--log-level: 'loud' is not one of debug, info, warning, error"),
    (["--rpc-bind", "a/b"], "--rpc-bind: 'a/b' is not a host name or IP address"),
    (["--miner-key", ""], "--miner-key: expected a non-empty string, got ''"),
]


@pytest.mark.parametrize(("argv", "message"), FLAG_ERRORS, ids=[row[0][0] for row in FLAG_ERRORS])
def test_bad_flag_value(datadir, argv, message):
    with pytest.raises(ConfigError) as err:
        load(datadir, *argv)
    assert str(err.value) == message


def test_a_bad_source_fails_the_whole_load(datadir):
    """A good file and good flags do not rescue one bad variable."""
    with pytest.raises(ConfigError, match="^DPODL_DEVICE: "):
        load(datadir, "--rpc-port", "1", env={"DPODL_DEVICE": "tpu"}, file="mine = true\n")


def test_config_is_frozen(datadir):
    config = load(datadir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rpc_port = 1  # type: ignore[misc]
    assert not hasattr(config, "__dict__")  # slots: no stray attributes either
    assert dataclasses.replace(config, rpc_port=1).rpc_port == 1
    assert isinstance(config.peers, tuple) and isinstance(config.rpc_auth, tuple)


def test_verify_workers_from_each_source(tmp_path):
    assert load(tmp_path, file="verify_workers = 3\n").verify_workers == 3
    assert load(tmp_path, env={"DPODL_VERIFY_WORKERS": "0"}).verify_workers == 0
    assert load(tmp_path, "--verify-workers", "2",
                env={"DPODL_VERIFY_WORKERS": "0"}).verify_workers == 2


@pytest.mark.parametrize(("argv", "env", "file", "error"), [
    (("--verify-workers", "-1"), {}, None, "--verify-workers: '-1' is not a number of processes"),
    (("--verify-workers", "65"), {}, None, "--verify-workers: 65 workers is out of range 0-64"),
    ((), {"DPODL_VERIFY_WORKERS": "two"}, None, "'two' is not a number of processes"),
    ((), {}, "verify_workers = true\n", "expected a number of processes, got True"),
    ((), {}, 'verify_workers = "2"\n', "expected a number of processes, got '2'"),
])
def test_bad_verify_workers_is_a_clear_error(tmp_path, argv, env, file, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        load(tmp_path, *argv, env=env, file=file)
