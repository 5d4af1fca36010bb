"""The `dpodl` command line: the node daemon and the clients that talk to it."""

import argparse
import asyncio
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

from consensus.blocks import compute_block_id
from consensus.params import NETWORKS, genesis_block
from consensus.tasks import compute_task_id


def _genesis(args: argparse.Namespace) -> int:
    params = NETWORKS[args.network]
    block = genesis_block(params)
    task = params.genesis_task
    print(f"network:      {params.name}")
    print(f"genesis id:   {compute_block_id(block.header).hex()}")
    print(f"fork rule:    {params.fork_rule}")
    print(f"task id:      {compute_task_id(task).hex()}")
    print(f"dataset:      {task.dataset.name.decode()} "
          f"({task.dataset.train_size}/{task.dataset.val_size}/{task.dataset.test_size})")
    print(f"block time:   {params.target_block_time} s target")
    return 0


def _node(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_config
    from node.datadir import DataDir, DataDirError
    from node.logs import setup_logging
    from node.methods import build_rpc
    from node.node import serve
    from storage.db import StorageError

    try:
        config = load_config(args, os.environ)
        setup_logging(config.log_level, DataDir(config.datadir).log_path)
        asyncio.run(serve(config, build_rpc))
    except (ConfigError, DataDirError, StorageError, OSError) as e:
        print(f"dpodl node: {e}", file=sys.stderr)
        return 1
    return 0


def _parse_param(text: str) -> object:
    """A command-line parameter: JSON where it parses (numbers, true, objects), else the
    text itself, as bitcoin-cli does."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _rpc(args: argparse.Namespace) -> int:
    from node.client import RpcClientError, call
    from node.config import ConfigError, load_config

    try:
        config = load_config(args, os.environ)
        credentials = None
        if args.rpc_user is not None:
            password = args.rpc_password or os.environ.get("DPODL_RPC_PASSWORD", "")
            credentials = (args.rpc_user, password)
        result = call(config, args.method, [_parse_param(p) for p in args.params],
                      credentials=credentials)
    except (ConfigError, RpcClientError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from consensus.keys import PrivateKey
    from node.datadir import DataDirError, write_key_file

    key = PrivateKey.generate()
    try:
        write_key_file(Path(args.out), key)
    except DataDirError as e:
        print(f"dpodl keygen: {e}", file=sys.stderr)
        return 1
    print(f"key:     {args.out}")
    print(f"address: {key.address.hex()}")
    return 0


def _rpcauth(args: argparse.Namespace) -> int:
    from node.auth import make_rpcauth

    line, password = make_rpcauth(args.user)
    print(f'rpcauth = ["{line}"]    # for dpodl.toml (or DPODL_RPCAUTH={line})')
    print(f"password: {password}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpodl",
        description="A full node of the D-PoDL chain, whose proof of work trains neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"dpodl {version('dpodl')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    genesis = commands.add_parser("genesis", help="show a network's genesis block and task")
    genesis.add_argument("--network", choices=sorted(NETWORKS), default="dev")
    genesis.set_defaults(run=_genesis)

    from node.config import add_node_arguments

    node = commands.add_parser("node", help="run a full node (JSON-RPC; --mine to mine)")
    add_node_arguments(node)
    node.set_defaults(run=_node)
    rpc = commands.add_parser("rpc", help="call a running node's JSON-RPC method")
    add_node_arguments(rpc)
    rpc.add_argument("--rpc-user", help="a configured RPC user (default: the node's cookie)")
    rpc.add_argument("--rpc-password", help="its password (or $DPODL_RPC_PASSWORD)")
    rpc.add_argument("method", help="the method, e.g. getblockcount; `help` lists them")
    rpc.add_argument("params", nargs="*", help="its parameters (JSON where they parse)")
    rpc.set_defaults(run=_rpc)
    keygen = commands.add_parser("keygen", help="create a key file and print its address")
    keygen.add_argument("--out", required=True, help="the key file to create (never overwritten)")
    keygen.set_defaults(run=_keygen)
    rpcauth = commands.add_parser("rpcauth", help="make an RPC user: a config line holding "
                                                  "only the password's salted hash")
    rpcauth.add_argument("user")
    rpcauth.set_defaults(run=_rpcauth)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
