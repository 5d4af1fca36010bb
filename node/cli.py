"""The `dpodl` command line."""

import argparse
import sys
from importlib.metadata import version

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
