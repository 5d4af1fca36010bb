"""The `dpodl` command line: the node daemon and the clients that talk to it."""

import argparse
import asyncio
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

from consensus.blocks import compute_block_id
from consensus.keys import PrivateKey
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


def _client(args: argparse.Namespace, method: str, *params: object) -> object:
    """Call the node the command's flags name (raises ConfigError, RpcClientError)."""
    from node.client import call
    from node.config import load_config

    credentials = None
    if getattr(args, "rpc_user", None) is not None:
        credentials = (args.rpc_user,
                       args.rpc_password or os.environ.get("DPODL_RPC_PASSWORD", ""))
    return call(load_config(args, os.environ), method, list(params), credentials=credentials)


def _client_errors() -> tuple[type[Exception], ...]:
    from node.client import RpcClientError
    from node.config import ConfigError
    from node.datadir import DataDirError

    return ConfigError, RpcClientError, DataDirError


def _send(args: argparse.Namespace) -> int:
    from consensus.encoding import encode
    from consensus.transactions import Transaction, Transfer, sign_tx

    try:
        to = bytes.fromhex(args.to)
        if len(to) != 20:
            raise ValueError
    except ValueError:
        print("dpodl send: --to must be an address: 40 hex digits", file=sys.stderr)
        return 2
    try:
        key = _sender_key(args)
        nonce = _client(args, "getaccount", key.address.hex())["pendingnonce"]
        tx = sign_tx(Transfer(key.pubkey, to, args.amount, args.fee, nonce), key)
        print(_client(args, "sendrawtransaction", encode(tx, Transaction).hex()))
    except _client_errors() as e:
        print(f"dpodl send: {e}", file=sys.stderr)
        return 1
    return 0


def _sender_key(args: argparse.Namespace) -> PrivateKey:
    from node.config import load_config
    from node.datadir import DataDir, read_key_file

    path = Path(args.key) if args.key else DataDir(load_config(args, os.environ).datadir).key_path
    return read_key_file(path)


def _submit_task(args: argparse.Namespace) -> int:
    from consensus.encoding import encode
    from consensus.transactions import TaskTx, Transaction, sign_tx
    from node.taskfile import TaskFileError, load_task_file

    try:
        key = _sender_key(args)
        task = load_task_file(Path(args.file), key.address)
        nonce = _client(args, "getaccount", key.address.hex())["pendingnonce"]
        tx = sign_tx(TaskTx(key.pubkey, task, args.fee, nonce), key)
        result = _client(args, "submittask", encode(tx, Transaction).hex())
    except (*_client_errors(), TaskFileError) as e:
        print(f"dpodl task submit: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _write_model(args: argparse.Namespace, model_id: str, file: str) -> str:
    """Write a chain model as TorchScript; a line saying what was written. Raises the
    client's errors, ValueError, KeyError or OSError."""
    from mining.datasets import compute_pixel_max
    from mining.export import export_model
    from node.client import model_blob

    model = _client(args, "getmodel", model_id, True)
    if "weights" not in model:
        raise ValueError(f"the node has no weights for model {model_id}")
    if "task" not in model:
        raise ValueError(f"model {model_id} is not on this chain")
    dataset = _client(args, "gettask", model["task"])["dataset"]["name"]
    export_model(model_blob(model), compute_pixel_max(dataset), Path(file))
    return (f"{file}: {model['parameters']} parameters, {dataset} images in; "
            "load with torch.jit.load")


def _export(args: argparse.Namespace) -> int:
    try:
        print(_write_model(args, args.model_id, args.file))
    except (*_client_errors(), ValueError, KeyError, OSError) as e:
        print(f"dpodl model export: {e}", file=sys.stderr)
        return 1
    return 0


def _task_result(args: argparse.Namespace) -> int:
    try:
        result = _client(args, "gettaskresult", args.task_id,
                         *(() if args.height is None else (args.height,)))
        written = args.export and _write_model(args, result["model"], args.export)
    except (*_client_errors(), ValueError, KeyError, OSError) as e:
        print(f"dpodl task result: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if written:
        print(written, file=sys.stderr)
    return 0


def _rpc(args: argparse.Namespace) -> int:
    try:
        result = _client(args, args.method, *[_parse_param(p) for p in args.params])
    except _client_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(result)
    elif result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _keygen(args: argparse.Namespace) -> int:
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


def _testnet(args: argparse.Namespace) -> int:
    from node import testnet_commands as testnet

    return {"up": testnet.up, "status": testnet.status,
            "down": testnet.down}[args.testnet_command](args)


def _amount(text: str) -> int:
    """An amount of base units: an integer that fits the chain's 64 bits."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 2^64 - 1")
    return value


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    from node.config import add_node_arguments

    add_node_arguments(parser)
    parser.add_argument("--rpc-user", help="a configured RPC user (default: the node's cookie)")
    parser.add_argument("--rpc-password", help="its password (or $DPODL_RPC_PASSWORD)")


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
    _client_arguments(rpc)
    rpc.add_argument("method", help="the method, e.g. getblockcount; `help` lists them")
    rpc.add_argument("params", nargs="*", help="its parameters (JSON where they parse)")
    rpc.set_defaults(run=_rpc)
    send = commands.add_parser("send", help="send coins from a key's account")
    _client_arguments(send)
    send.add_argument("--to", required=True, help="the recipient's address (40 hex digits)")
    send.add_argument("--amount", required=True, type=_amount, help="base units")
    send.add_argument("--fee", type=_amount, default=1, help="base units (default 1)")
    send.add_argument("--key", help="the sender's key file (default: the node's miner key)")
    send.set_defaults(run=_send)
    task = commands.add_parser("task", help="tasks for the miners")
    task_commands = task.add_subparsers(dest="task_command", metavar="COMMAND", required=True)
    submit = task_commands.add_parser("submit", help="publish a task from a TOML file, "
                                                     "escrowing its bounty")
    _client_arguments(submit)
    submit.add_argument("file", help="the task file (see node/taskfile.py for its fields)")
    submit.add_argument("--fee", type=_amount, default=1, help="base units (default 1)")
    submit.add_argument("--key", help="the publisher's key file (default: the node's key)")
    submit.set_defaults(run=_submit_task)
    result = task_commands.add_parser("result", help="the best model a finished task "
                                                     "delivered (gettaskresult)")
    _client_arguments(result)
    result.add_argument("task_id", nargs="?", help="the task (default: the last to finish)")
    result.add_argument("--height", type=int, help="the task's span that covers this height")
    result.add_argument("--export", metavar="FILE", help="also write the model to FILE")
    result.set_defaults(run=_task_result)
    model = commands.add_parser("model", help="models on the chain")
    model_commands = model.add_subparsers(dest="model_command", metavar="COMMAND",
                                          required=True)
    export = model_commands.add_parser("export", help="write a model as a file plain "
                                                      "torch loads (torch.jit.load)")
    _client_arguments(export)
    export.add_argument("model_id")
    export.add_argument("file")
    export.set_defaults(run=_export)
    keygen = commands.add_parser("keygen", help="create a key file and print its address")
    keygen.add_argument("--out", required=True, help="the key file to create (never overwritten)")
    keygen.set_defaults(run=_keygen)
    rpcauth = commands.add_parser("rpcauth", help="make an RPC user: a config line holding "
                                                  "only the password's salted hash")
    rpcauth.add_argument("user")
    rpcauth.set_defaults(run=_rpcauth)
    _testnet_parser(commands)
    return parser


def _testnet_parser(commands: argparse._SubParsersAction) -> None:
    testnet = commands.add_parser("testnet", help="a local testnet: node processes on loopback")
    testnet_commands = testnet.add_subparsers(dest="testnet_command", metavar="COMMAND",
                                              required=True)
    up = testnet_commands.add_parser(
        "up", help="start the nodes, each dialling those before it, and watch over them "
                   "until Ctrl-C, which stops them all")
    up.add_argument("--nodes", type=int, default=3, metavar="N", help="how many (default 3)")
    up.add_argument("--miners", type=int, default=1, metavar="M",
                    help="how many of them mine (default 1): node0 to node(M-1)")
    # The dev chains only: their digits task is embedded, testnet's MNIST is a download.
    up.add_argument("--network", choices=["dev", "dev-accuracy"], default="dev")
    up.add_argument("--detach", action="store_true",
                    help="leave the nodes running and return once they answer RPC")
    status = testnet_commands.add_parser(
        "status", help="every node's height, tip and peer count, side by side")
    down = testnet_commands.add_parser("down", help="stop every node cleanly")
    for command in (up, status, down):
        command.add_argument("--datadir", required=True, metavar="DIR",
                             help="the testnet's directory: DIR/node0, DIR/node1, ...")
        command.set_defaults(run=_testnet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C before the node's own handlers are in place
        return 130


if __name__ == "__main__":
    sys.exit(main())
