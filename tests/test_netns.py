"""docker/compose.yaml's testnet run for real, without containers: each service's command
as a process in a network namespace of its own (tests/netns.py), the nodes finding each
other by service name across real interfaces, mining, agreeing, split and healed."""

import time

import pytest

from node.auth import make_rpcauth
from tests.compose import ComposeError, interpolate, load_services
from tests.netns import NetnsTestnet, NetnsUnavailable, RpcError

slow = pytest.mark.slow  # four nodes, two of them mining, for about half a minute

USER = "netns"
START_TIMEOUT = 120.0  # four nodes importing torch and training on a busy machine
SYNC_TIMEOUT = 120.0
MIN_BLOCKS = 5
# New blocks each side of a split mines before it heals. Few, and healed at once: a node
# keeps the checkpoints of its last keep_checkpoints blocks only (storage/retention.py),
# so a split deeper than that (10 to 20 s of the dev chain's first minutes) finds no peer
# to serve the checkpoints the other side's blocks are checked with, and does not heal.
PARTITION_BLOCKS = 2


@pytest.mark.parametrize(("text", "environ", "expected"), [
    ("a$$b", {}, "a$b"),
    ("${X}/$X", {"X": "1"}, "1/1"),
    ("${X}", {}, ""),
    ("${X-d}", {}, "d"),
    ("${X-d}", {"X": ""}, ""),
    ("${X:-d}", {"X": ""}, "d"),
    ("${X:?set X}", {"X": "u:s$$h"}, "u:s$$h"),  # a value is not interpolated again
])
def test_variables_are_substituted_as_compose_does(text, environ, expected):
    assert interpolate(text, environ) == expected


@pytest.mark.parametrize("environ", [{}, {"DPODL_RPCAUTH": ""}])
def test_the_testnet_needs_an_rpc_user_as_under_compose(environ):
    with pytest.raises(ComposeError, match="DPODL_RPCAUTH"):
        load_services(environ)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    rpcauth, password = make_rpcauth(USER)
    # The rpcauth line as a user of compose gives it, through the file's ${DPODL_RPCAUTH}.
    services = load_services({"DPODL_RPCAUTH": rpcauth})
    try:
        testnet = NetnsTestnet(services, tmp_path_factory.mktemp("netns"), auth=(USER, password))
        with testnet:
            yield testnet
    except NetnsUnavailable as e:
        pytest.skip(str(e))


def wait_until(predicate, what: str, net: NetnsTestnet, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, RpcError):
            pass  # a node not answering yet, or cut off
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {name}\n" + "\n".join(net.log(name).splitlines()[-15:])
                              for name in net.services)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.25)


def tips(net: NetnsTestnet, names) -> dict[str, tuple[int, str]]:
    """Each node's (height, best block hash)."""
    tips = {}
    for name in names:
        info = net.call(name, "getblockchaininfo")
        tips[name] = info["blocks"], info["bestblockhash"]
    return tips


def agree(net: NetnsTestnet, names, *, above: int) -> bool:
    """Whether the nodes share one tip, higher than `above`."""
    found = set(tips(net, names).values())
    return len(found) == 1 and next(iter(found))[0] > above


@slow
def test_nodes_dial_each_other_by_service_name(net):
    # Who dials whom, from the commands' --peer HOST:PORT, as the node parsed them.
    dials = {(name, host): port for name, config in net.configs.items()
             for host, port in config.peers}
    assert dials, "the compose file's nodes dial nobody"

    def linked() -> bool:
        peers = {name: net.call(name, "getpeerinfo") for name in net.services}
        for (dialler, host), port in dials.items():
            # The dialler reaches the name's address at the named port, marked manual; the
            # dialled node sees it coming from the dialler's own address, not loopback.
            if not any(p["addr"] == f"{net.ip[host]}:{port}" and not p["inbound"]
                       and p["manual"] for p in peers[dialler]):
                return False
            if not any(p["addr"].rpartition(":")[0] == net.ip[dialler] and p["inbound"]
                       for p in peers[host]):
                return False
        return True

    wait_until(linked, "every --peer connected by service name", net, START_TIMEOUT)


@slow
def test_every_node_answers_its_health_check(net):
    for name in net.services:
        wait_until(lambda name=name: net.health(name)[0] == 200, f"{name}'s /health", net,
                   START_TIMEOUT)
        status, body = net.health(name)
        assert status == 200 and body["status"] == "ok", (name, body)
        # And compose's own health check, run inside the node's namespace.
        done = net.healthcheck(name)
        assert done.returncode == 0, (name, done.stderr)


@slow
def test_the_chain_grows_and_every_node_agrees_on_its_tip(net):
    wait_until(lambda: agree(net, net.services, above=MIN_BLOCKS - 1),
               f"all nodes on one tip of at least {MIN_BLOCKS} blocks", net, SYNC_TIMEOUT)


@slow
def test_a_split_network_mines_on_both_sides_and_heals(net):
    miners = sorted(name for name, config in net.configs.items() if config.mine)
    alone = miners[-1]  # miner2: cut off with nobody
    rest = [name for name in net.services if name != alone]  # miner1 and the relays
    start = max(height for height, _ in tips(net, net.services).values())

    net.link_down(alone)
    try:
        wait_until(lambda: tips(net, [alone])[alone][0] >= start + PARTITION_BLOCKS,
                   f"{alone} mining alone", net, SYNC_TIMEOUT)
        wait_until(lambda: agree(net, rest, above=start + PARTITION_BLOCKS - 1),
                   f"{', '.join(rest)} mining on one tip", net, SYNC_TIMEOUT)
        split = tips(net, [alone, rest[0]])
        assert split[alone] != split[rest[0]], "the two sides did not diverge"
    finally:
        net.link_up(alone)

    # A tip above both sides', so that a race at the top cannot undo the check below.
    wait_until(lambda: agree(net, net.services, above=max(h for h, _ in split.values())),
               "all nodes on one tip again", net, SYNC_TIMEOUT)
    # One side's tip of the split is on the chain every node now has; the other side's
    # blocks were given up. Were one tip the other's ancestor, both would be found.
    kept = [side for side, (height, block) in split.items()
            if net.call(rest[0], "getblockhash", height) == block]
    assert len(kept) == 1, (split, kept)


@slow
def test_every_node_stops_cleanly_as_compose_stops_it(net):
    codes = net.stop()  # SIGTERM, then SIGKILL after compose's stop_grace_period
    assert codes == dict.fromkeys(net.services, 0), codes
    for name in net.services:  # nothing went wrong unnoticed, such as an unawaited task
        console = net.console(name)
        assert "Traceback" not in console, f"{name}:\n{console[-3000:]}"
