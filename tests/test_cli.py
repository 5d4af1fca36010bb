"""The `dpodl` commands that need no running node, called as a user calls them."""

import base64
import re
import stat
from importlib.metadata import version

import pytest

from node.auth import Authenticator
from node.cli import main
from node.datadir import read_key_file


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"dpodl {version('dpodl')}"


def test_keygen_creates_a_private_key_file_once(tmp_path, capsys):
    path = tmp_path / "alice.key"
    assert main(["keygen", "--out", str(path)]) == 0
    address = re.search(r"address: ([0-9a-f]{40})", capsys.readouterr().out).group(1)
    assert read_key_file(path).address.hex() == address
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    assert main(["keygen", "--out", str(path)]) == 1
    assert "alice.key" in capsys.readouterr().err and path.read_bytes() == before


def test_rpcauth_line_admits_its_password_and_nothing_else(capsys):
    assert main(["rpcauth", "alice"]) == 0
    out = capsys.readouterr().out
    line = re.search(r'rpcauth = \["([^"]+)"\]', out).group(1)
    password = re.search(r"password: (\S+)", out).group(1)
    assert password not in line  # only the salted hash is kept
    auth = Authenticator(None, [line])

    def basic(user: str, pw: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    assert auth.check(basic("alice", password))
    assert not auth.check(basic("alice", password + "x"))
    assert not auth.check(basic("bob", password))


@pytest.mark.parametrize("flag", ["--amount", "--fee"])
def test_send_refuses_amounts_beyond_64_bits(capsys, flag):
    argv = ["send", "--to", "ab" * 20, "--amount", "1", flag, str(1 << 64)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "not between 0 and 2^64 - 1" in capsys.readouterr().err


def test_send_refuses_a_bad_address_before_anything_else(capsys):
    assert main(["send", "--to", "not-hex", "--amount", "1"]) == 2
    assert "40 hex digits" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["rpc", "--datadir", "{d}", "getblockcount"], "is the node running?"),
    (["model", "export", "--datadir", "{d}", "00" * 32, "m.pt"], "is the node running?"),
    (["task", "submit", "--datadir", "{d}", "task.toml"], "cannot read key file"),
])
def test_client_commands_say_what_is_missing(tmp_path, capsys, argv, message):
    assert main([a.replace("{d}", str(tmp_path)) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_node_refuses_a_bad_flag_with_its_name(tmp_path, capsys):
    assert main(["node", "--datadir", str(tmp_path), "--rpc-port", "70000"]) == 1
    assert "--rpc-port" in capsys.readouterr().err
