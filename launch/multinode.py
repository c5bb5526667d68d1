#!/usr/bin/env python3
"""Start a jaxrlhf stage on this node of an N-node job (torchrun-style, no scheduler needed).

Run the same command on every node, changing only --node-rank:

    python launch/multinode.py --nnodes 2 --node-rank 0 --coordinator 10.0.0.1:8476 -- \\
        sft --config configs/llama3_8b/sft_lora.yaml --set optim.total_steps=1000

One process per node (default) drives all of the node's accelerators; --nproc-per-node K starts K local
processes instead, process k driving device k (JAX_LOCAL_DEVICE_IDS=k; with --local-device-ids L, the k-th
of K equal chunks of L). Each process gets

    JAX_COORDINATOR_ADDRESS=<--coordinator>     host:port of process 0 (on node 0), reachable from all nodes
    JAX_NUM_PROCESSES=nnodes * nproc_per_node
    JAX_PROCESS_ID=node_rank * nproc_per_node + k
    JAX_LOCAL_DEVICE_IDS=...                    only with --nproc-per-node > 1 or --local-device-ids

and runs `PYTHON -m jaxrlhf STAGE ARGS... --distributed`. CUDA_VISIBLE_DEVICES is left as it is: JAX's device
ids count the devices it leaves visible, so restricting both would select the wrong GPU. With one process the
launcher execs the stage (signals and exit status are the stage's); with several it waits for all, stops the
others when one fails, and exits with the first failure's status.

--dry-run prints one line per process: the variables and the command, as a shell would run them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (e.g. 10.0.0.1:8476)")
    return text


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of device ids") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: device ids must be distinct and >= 0")
    return ids


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        head, stage = argv, []
    else:
        cut = argv.index("--")
        head, stage = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="launch/multinode.py",
        usage="%(prog)s --nnodes N --node-rank R --coordinator HOST:PORT [options] -- STAGE [ARGS...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Everything after -- is the jaxrlhf command line (sft --config FILE --set k=v ...), verbatim.",
    )
    p.add_argument("--nnodes", type=int, required=True, help="number of nodes in the job")
    p.add_argument("--node-rank", type=int, required=True, help="this node's index, 0 .. nnodes-1")
    p.add_argument("--coordinator", type=_address, required=True, help="host:port of node 0 (process 0)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node (default 1)")
    p.add_argument("--local-device-ids", type=_ids, help="devices of this node to use, e.g. 0,1,2,3")
    p.add_argument(
        "--python", default=sys.executable, help="interpreter that has jaxrlhf (default: this one)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print each process's variables + command, run nothing"
    )
    args = p.parse_args(head)
    if args.nnodes < 1 or args.nproc_per_node < 1:
        p.error("--nnodes and --nproc-per-node must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1}")
    if args.local_device_ids is not None and len(args.local_device_ids) % args.nproc_per_node:
        p.error(
            f"--local-device-ids has {len(args.local_device_ids)} ids for {args.nproc_per_node} processes"
        )
    if not stage or stage[0].startswith("-"):
        p.error("give the jaxrlhf command after --, e.g. -- sft --config configs/tiny/sft.yaml")
    if stage[0] == "generate":
        p.error("jaxrlhf generate runs on one host; start it directly")
    return args, stage


def process_plan(args: argparse.Namespace, stage: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """``[(variables, argv)]`` for each local process."""
    k_total = args.nproc_per_node
    command = [args.python, "-m", "jaxrlhf", *stage]
    if "--distributed" not in stage:
        command.append("--distributed")
    ids = args.local_device_ids
    if ids is None and k_total > 1:
        ids = list(range(k_total))
    per = len(ids) // k_total if ids is not None else 0
    plan = []
    for k in range(k_total):
        env = {
            "JAX_COORDINATOR_ADDRESS": args.coordinator,
            "JAX_NUM_PROCESSES": str(args.nnodes * k_total),
            "JAX_PROCESS_ID": str(args.node_rank * k_total + k),
        }
        if ids is not None:
            env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in ids[k * per : (k + 1) * per])
        plan.append((env, command))
    return plan


def format_process(env: dict[str, str], command: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)])


def _exit_status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode  # killed by signal N: 128 + N, as a shell says


def _run_all(plan: list[tuple[dict[str, str], list[str]]]) -> int:
    procs = [subprocess.Popen(cmd, env={**os.environ, **env}) for env, cmd in plan]
    names = [
        f"JAX_PROCESS_ID={env['JAX_PROCESS_ID']} (pid {p.pid})"
        for (env, _), p in zip(plan, procs, strict=True)
    ]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = 0
    while True:
        failed = [(n, p) for n, p in zip(names, procs, strict=True) if p.poll() not in (None, 0)]
        if failed and not status:
            name, first = failed[0]
            status = _exit_status(first.returncode)
            print(f"multinode.py: {name} exited {first.returncode}; stopping the others", file=sys.stderr)
            forward(signal.SIGTERM, None)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.2)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    return status


def main(argv: list[str] | None = None) -> int:
    args, stage = parse_args(sys.argv[1:] if argv is None else argv)
    plan = process_plan(args, stage)
    if args.dry_run:
        for env, command in plan:
            print(format_process(env, command))
        return 0
    if len(plan) == 1:
        env, command = plan[0]
        os.execvpe(command[0], command, {**os.environ, **env})
    return _run_all(plan)


if __name__ == "__main__":
    sys.exit(main())
