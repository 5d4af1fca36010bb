"""`dpodl testnet up|status|down`: a local testnet of node processes (node/testnet.py).

`up` picks free loopback ports, writes each node's dpodl.toml (node/testnet.py's
LocalNode) and DIR/testnet.json, starts the nodes, each dialling those before it, and
then either returns (--detach) or watches over them until SIGINT, SIGTERM or SIGHUP,
which stop them all. `status` and `down` read DIR/testnet.json and find each node by
its data directory's lock, so they work from any terminal, after either kind of `up`.
"""

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from node.client import RpcClientError
from node.testnet import (
    MAX_NODES,
    POLL,
    TERM_TIMEOUT,
    LocalNode,
    TestnetError,
    free_port,
    lock_holder,
    stop_all,
    tail,
)

STATE_NAME = "testnet.json"


def _nodes_of(state: dict) -> list[LocalNode]:
    return [LocalNode(Path(n["datadir"]), network=state["network"], rpc_port=n["rpc_port"],
                      p2p_port=n["p2p_port"], peers=tuple(n["peers"]), mine=n["mine"])
            for n in state["nodes"]]


def _state(nodes: list[LocalNode], network: str, supervisor: int | None) -> dict:
    return {"network": network, "supervisor": supervisor, "stopping": False,
            "nodes": [{"datadir": str(n.datadir), "rpc_port": n.rpc_port,
                       "p2p_port": n.p2p_port, "peers": list(n.peers), "mine": n.mine}
                      for n in nodes]}


def read_state(directory: Path) -> dict | None:
    """The testnet in `directory`, None if it holds none (TestnetError if unreadable)."""
    path = directory / STATE_NAME
    try:
        state = json.loads(path.read_text())
        _nodes_of(state)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TestnetError(f"{path} is not a testnet's state file: {e}") from None
    return state


def write_state(directory: Path, state: dict) -> None:
    tmp = directory / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(directory / STATE_NAME)  # `status` and `down` never read half a file


def _supervisor_alive(state: dict) -> int | None:
    """The pid of the `testnet up` supervising this testnet, if it still runs."""
    pid = state.get("supervisor")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except ProcessLookupError:
        return None
    except OSError:  # no /proc here (or no right to read it): the pid alone must do
        return pid
    return pid if b"testnet" in cmdline else None  # a stale pid reused by another program


def _running(state: dict) -> list[str]:
    running = [f"{n.name} (pid {pid})" for n in _nodes_of(state)
               if (pid := lock_holder(n.datadir)) is not None]
    if (pid := _supervisor_alive(state)) is not None:
        running.append(f"its `testnet up` (pid {pid})")
    return running


# -- `dpodl testnet up`, `status`, `down` ----------------------------------------------------


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP (its terminal closed) reached `testnet up`."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _plan(args: argparse.Namespace, directory: Path) -> list[LocalNode]:
    """The nodes `up` is asked for, or TestnetError saying why not."""
    if args.nodes < 1:
        raise TestnetError(f"--nodes {args.nodes}: a testnet needs at least 1 node")
    if args.nodes > MAX_NODES:
        raise TestnetError(f"--nodes {args.nodes}: at most {MAX_NODES} on one machine")
    if not 0 <= args.miners <= args.nodes:
        raise TestnetError(f"--miners {args.miners}: between 0 and --nodes ({args.nodes})")
    if directory.exists() and not directory.is_dir():
        raise TestnetError(f"{directory} is not a directory")
    state = read_state(directory)
    if state is None and directory.exists() and any(directory.iterdir()):
        raise TestnetError(f"{directory} is not empty and holds no testnet ({STATE_NAME}); "
                           "give a new or empty directory")
    if state is not None:
        if running := _running(state):
            raise TestnetError(f"{directory} holds a running testnet: {', '.join(running)}; "
                               f"`dpodl testnet down --datadir {directory}` stops it")
        if state["network"] != args.network:
            raise TestnetError(f"{directory} holds a {state['network']} testnet, not "
                               f"{args.network}; give another directory")
    # Each node dials every node before it: all of them are linked from the start.
    nodes: list[LocalNode] = []
    for i in range(args.nodes):
        nodes.append(LocalNode(directory / f"node{i}", network=args.network,
                               rpc_port=free_port(), p2p_port=free_port(),
                               peers=tuple(n.p2p_addr for n in nodes), mine=i < args.miners))
    return nodes


def _print_nodes(nodes: list[LocalNode], directory: Path) -> None:
    print(f"{nodes[0].network} testnet in {directory}: {len(nodes)} node(s), "
          f"{sum(n.mine for n in nodes)} mining")
    rows = [("node", "role", "pid", "json-rpc", "p2p")] + [
        (n.name, "miner" if n.mine else "relay", str(n.pid or "-"),
         f"http://127.0.0.1:{n.rpc_port}/", n.p2p_addr) for n in nodes]
    _print_table(rows)
    first = nodes[0]
    print(f"\nQuery a node (its dpodl.toml names its port, and its .cookie is the password):\n"
          f"  dpodl rpc --datadir {first.datadir} getblockchaininfo\n"
          f"  dpodl rpc --datadir {first.datadir} --rpc-port {first.rpc_port} getpeerinfo\n"
          f"All of them side by side:  dpodl testnet status --datadir {directory}\n"
          f"Stop them:                 dpodl testnet down --datadir {directory}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def up(args: argparse.Namespace) -> int:
    directory = Path(args.datadir).absolute()
    try:
        nodes = _plan(args, directory)
        directory.mkdir(parents=True, exist_ok=True)
    except (TestnetError, OSError) as e:
        print(f"dpodl testnet up: {e}", file=sys.stderr)
        return 1
    supervisor = None if args.detach else os.getpid()
    write_state(directory, _state(nodes, args.network, supervisor))
    previous = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS}
    try:
        try:
            for node in nodes:
                node.write_config()
                node.start()
            for node in nodes:
                node.wait_ready()
        except TestnetError as e:
            print(f"dpodl testnet up: {e}", file=sys.stderr)
            _stop_and_report(nodes)
            return 1
        _print_nodes(nodes, directory)
        if args.detach:
            return 0
        print("\nSupervising; Ctrl-C stops every node.", flush=True)
        return _supervise(nodes, directory)
    except _Interrupted as e:
        print(f"\n{e}: stopping the testnet", flush=True)
        return _stop_and_report(nodes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if supervisor is not None:
            with contextlib.suppress(TestnetError, OSError, TypeError):
                if (state := read_state(directory)) and state["supervisor"] == supervisor:
                    write_state(directory, state | {"supervisor": None})


def _supervise(nodes: list[LocalNode], directory: Path) -> int:
    """Report nodes that exit until none is left (or SIGINT); 0 if `down` stopped them."""
    live = list(nodes)
    unexpected = 0
    while live:
        time.sleep(POLL)
        for node in [n for n in live if n.proc is not None and n.proc.poll() is not None]:
            live.remove(node)
            state = read_state(directory) or {}
            if state.get("stopping"):
                print(f"{node.name}: stopped by `dpodl testnet down`", flush=True)
                continue
            unexpected += 1
            print(f"{node.name} (pid {node.proc.pid}) exited unexpectedly with code "
                  f"{node.proc.returncode}; the end of its log {node.log_path}:\n"
                  f"{tail(node.log_path, 5)}", flush=True)
    return 1 if unexpected else 0


def _stop_and_report(nodes: list[LocalNode]) -> int:
    # A second Ctrl-C while stopping must not leave half-stopped nodes behind.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    results = stop_all(nodes)
    for line in results:
        print(line, flush=True)
    return 0 if all(": stopped" in r or "not running" in r for r in results) else 1


def _existing_state(directory: Path) -> dict:
    """The testnet state file's contents; TestnetError when there is none."""
    state = read_state(directory)
    if state is None:
        raise TestnetError(f"{directory} holds no testnet ({STATE_NAME})")
    return state


def status(args: argparse.Namespace) -> int:
    directory = Path(args.datadir).absolute()
    try:
        state = _existing_state(directory)
    except TestnetError as e:
        print(f"dpodl testnet status: {e}", file=sys.stderr)
        return 1
    rows = [("node", "state", "pid", "rpc-port", "height", "tip", "peers", "mining")]
    for node in _nodes_of(state):
        pid = node.pid
        row = [node.name, "stopped", str(pid or "-"), str(node.rpc_port)]
        if pid is not None:
            try:
                info = node.rpc("getblockchaininfo", timeout=10.0)
                peers = node.rpc("getconnectioncount", timeout=10.0)
                mining = node.rpc("getmininginfo", timeout=10.0)["generate"]
                row[1:] = ["running", str(pid), str(node.rpc_port), str(info["blocks"]),
                           info["bestblockhash"][:16], str(peers), "yes" if mining else "no"]
            except (RpcClientError, TestnetError) as e:
                row[1] = "no answer"
                print(f"{node.name}: {e}", file=sys.stderr)
        rows.append(tuple(row + ["-"] * (len(rows[0]) - len(row))))
    _print_table(rows)
    return 0


def down(args: argparse.Namespace) -> int:
    directory = Path(args.datadir).absolute()
    try:
        state = _existing_state(directory)
        # A supervising `up` reads this when its nodes exit: they were meant to.
        write_state(directory, state | {"stopping": True})
    except (TestnetError, OSError) as e:
        print(f"dpodl testnet down: {e}", file=sys.stderr)
        return 1
    results = stop_all(_nodes_of(state))
    for line in results:
        print(line)
    supervisor = _supervisor_alive(state)
    deadline = time.monotonic() + TERM_TIMEOUT
    while supervisor is not None and _supervisor_alive(state) and time.monotonic() < deadline:
        time.sleep(POLL)
    if supervisor is not None:
        print(f"its `testnet up` (pid {supervisor}): "
              + ("exited" if _supervisor_alive(state) is None else "still running"))
    return 0 if not _running(state) else 1

