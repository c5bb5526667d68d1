"""Multi-host start-up: which ``jax.distributed.initialize`` arguments the environment asks for.

Sources, first match wins (``resolve_distributed_env``):

1. ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
   ``JAX_LOCAL_DEVICE_IDS`` (comma-separated ints: the accelerators this process drives). When the first three
   are all set they are final: JAX's own cluster detection is switched off under Slurm / Open MPI, where it
   would otherwise pin one GPU per task (right for one task per GPU, wrong for one task per node).
2. SkyPilot (``SKYPILOT_NODE_RANK``, ``SKYPILOT_NODE_IPS`` one IP per line, ``SKYPILOT_NUM_NODES``): process 0
   is the first IP. Not on a Cloud TPU VM: a TPU pod slice is one SkyPilot node with several hosts, and JAX
   reads the true host list from the TPU metadata server.
3. torchrun-style (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` + ``RANK`` per process, or ``NNODES`` +
   ``NODE_RANK`` per node). Under torchrun itself (``TORCHELASTIC_RUN_ID`` set) the elastic agent's TCPStore
   already listens on ``MASTER_PORT``, so the JAX coordinator takes ``MASTER_PORT + 1``; with several
   processes per node (``LOCAL_WORLD_SIZE`` > 1) each drives the device ``LOCAL_RANK``.

``JAX_COORDINATOR_PORT`` overrides the port of the derived addresses (2, 3), as it does in JAX's detection.
Nothing found: ``jax.distributed.initialize()`` is called without arguments and JAX detects the cluster:

- Cloud TPU VM / pod slice (libtpu + TPU chips): coordinator, host count and index from the GCE metadata
  server (``worker-network-endpoints``, ``agent-worker-number``); GKE: ``TPU_WORKER_HOSTNAMES`` /
  ``TPU_PROCESS_ADDRESSES`` + ``TPU_WORKER_ID``; multislice: ``MEGASCALE_*``. Each process sees its host's
  chips.
- Slurm (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``,
  i.e. inside ``srun``): coordinator = first node of the step, port derived from the job id; process id
  ``SLURM_PROCID``; on GPUs each task drives the one device ``SLURM_LOCALID`` (launch one task per GPU).
- Open MPI (``OMPI_MCA_orte_hnp_uri``): the same from ``OMPI_COMM_WORLD_*``.

When is it called (``wants_distributed``): ``--distributed``, ``JAXRLHF_DISTRIBUTED=1`` or a set
``JAX_COORDINATOR_ADDRESS``. The launchers in ``launch/`` set these variables.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("jaxrlhf")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
DEFAULT_PORT = 8476  # JAX's default coordinator port on Cloud TPU
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedEnvError(ValueError):
    """The multi-host variables are inconsistent; the message names the variable and the fix."""


def wants_distributed(flag: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """True for ``--distributed``, ``JAXRLHF_DISTRIBUTED=1|true|yes|on`` or a set
    ``JAX_COORDINATOR_ADDRESS``."""
    env = os.environ if environ is None else environ
    value = env.get("JAXRLHF_DISTRIBUTED", "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise DistributedEnvError(f"JAXRLHF_DISTRIBUTED={value!r}: use 1/true/yes/on or 0/false/no/off")
    return flag or value in _TRUE or bool(env.get("JAX_COORDINATOR_ADDRESS"))


def detected_cluster(environ: Mapping[str, str], *, tpu_vm: bool = False) -> str | None:
    """The cluster JAX's own detection would find from these variables (``tpu_vm``: running on a TPU VM)."""
    if tpu_vm:
        return "cloud-tpu"
    if all(k in environ for k in _SLURM_VARS):
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "openmpi"
    return None


def resolve_distributed_env(environ: Mapping[str, str], *, tpu_vm: bool = False) -> dict[str, Any] | None:
    """Keyword arguments of ``jax.distributed.initialize`` that ``environ`` asks for; ``None`` when it names
    no cluster itself (then JAX's detection decides; see the module docstring).

    Raises ``DistributedEnvError`` (naming the variable) on a malformed or inconsistent environment.
    """
    return _resolve(environ, tpu_vm=tpu_vm)[0]


def _resolve(environ: Mapping[str, str], *, tpu_vm: bool) -> tuple[dict[str, Any] | None, str]:
    env = {k: v.strip() for k, v in environ.items() if isinstance(v, str)}
    cluster = detected_cluster(env, tpu_vm=tpu_vm)
    local = env.get("JAX_LOCAL_DEVICE_IDS")
    local_ids = {"local_device_ids": parse_device_ids(local)} if local else {}
    if any(env.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
        kwargs, source = _from_jax_vars(env, cluster), "JAX_* variables"
    elif not tpu_vm and env.get("SKYPILOT_NODE_IPS") and env.get("SKYPILOT_NODE_RANK"):
        kwargs, source = _from_skypilot(env), "SkyPilot variables"
    elif env.get("MASTER_ADDR"):
        kwargs, source = _from_torchrun(env), "torchrun-style variables"
    elif local_ids and cluster is None:
        raise DistributedEnvError(
            f"JAX_LOCAL_DEVICE_IDS={local!r} is set but nothing names the coordinator: set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID too"
        )
    else:
        return local_ids or None, f"detected by JAX ({cluster})" if cluster else "detected by JAX"
    if local_ids:
        kwargs.pop("cluster_detection_method", None)
    return {**kwargs, **local_ids}, source


def _int(env: Mapping[str, str], key: str, *, minimum: int) -> int:
    try:
        value = int(env[key])
    except ValueError:
        raise DistributedEnvError(f"{key}={env[key]!r} is not an integer") from None
    if value < minimum:
        raise DistributedEnvError(f"{key}={value} must be >= {minimum}")
    return value


def check_address(address: str, key: str) -> str:
    """``host:port`` (IPv6 hosts in brackets, ``[::1]:1234``) with a port in 1..65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise DistributedEnvError(
            f"{key}={address!r} has no port: write host:port, e.g. {address or '10.0.0.2'}:{DEFAULT_PORT}"
            " (IPv6 as [addr]:port)"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedEnvError(f"{key}={address!r}: port {port!r} is not a number in 1..65535")
    return address


def _port(env: Mapping[str, str], default: int) -> int:
    if not env.get("JAX_COORDINATOR_PORT"):
        return default
    port = _int(env, "JAX_COORDINATOR_PORT", minimum=1)
    if port > 65535:
        raise DistributedEnvError(f"JAX_COORDINATOR_PORT={port} is not a port (1..65535)")
    return port


def parse_device_ids(text: str, key: str = "JAX_LOCAL_DEVICE_IDS") -> list[int]:
    """``"0,1,3"`` -> ``[0, 1, 3]``: distinct non-negative ints."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise DistributedEnvError(
            f"{key}={text!r}: expected comma-separated device ids, e.g. 0,1,2,3"
        ) from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise DistributedEnvError(f"{key}={text!r}: device ids must be distinct and >= 0")
    return ids


def _check_rank(pid: int, n: int, pid_key: str, n_key: str) -> None:
    if pid >= n:
        raise DistributedEnvError(f"{pid_key}={pid} but {n_key}={n}: process ids run from 0 to {n - 1}")


def _from_jax_vars(env: Mapping[str, str], cluster: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = check_address(
            env["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS"
        )
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = _int(env, "JAX_NUM_PROCESSES", minimum=1)
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = _int(env, "JAX_PROCESS_ID", minimum=0)
    if "num_processes" in kwargs and "process_id" in kwargs:
        _check_rank(kwargs["process_id"], kwargs["num_processes"], "JAX_PROCESS_ID", "JAX_NUM_PROCESSES")
    explicit = {"coordinator_address", "num_processes", "process_id"}
    if cluster is None and explicit & kwargs.keys() and not explicit <= kwargs.keys():
        missing = sorted(k for k in explicit - kwargs.keys())
        names = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES"}
        names["process_id"] = "JAX_PROCESS_ID"
        raise DistributedEnvError(
            f"{', '.join(names[k] for k in missing)} not set: outside a detected cluster (Cloud TPU, Slurm, "
            "Open MPI) set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID together"
        )
    if explicit <= kwargs.keys() and cluster in ("slurm", "openmpi"):
        kwargs["cluster_detection_method"] = "deactivate"  # explicit values are final (module docstring)
    return kwargs


def _from_skypilot(env: Mapping[str, str]) -> dict[str, Any]:
    ips = [line.strip() for line in env["SKYPILOT_NODE_IPS"].splitlines() if line.strip()]
    num = _int(env, "SKYPILOT_NUM_NODES", minimum=1) if env.get("SKYPILOT_NUM_NODES") else len(ips)
    if num != len(ips):
        raise DistributedEnvError(
            f"SKYPILOT_NUM_NODES={num} but SKYPILOT_NODE_IPS lists {len(ips)} address(es)"
        )
    rank = _int(env, "SKYPILOT_NODE_RANK", minimum=0)
    _check_rank(rank, num, "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES")
    host = f"[{ips[0]}]" if ":" in ips[0] else ips[0]
    address = check_address(f"{host}:{_port(env, DEFAULT_PORT)}", "SKYPILOT_NODE_IPS")
    return dict(coordinator_address=address, num_processes=num, process_id=rank)


def _from_torchrun(env: Mapping[str, str]) -> dict[str, Any]:
    if not env.get("MASTER_PORT"):
        raise DistributedEnvError(f"MASTER_ADDR={env['MASTER_ADDR']!r} is set but MASTER_PORT is not")
    master_port = _int(env, "MASTER_PORT", minimum=1)
    # torchrun's agent holds MASTER_PORT (its TCPStore): take the next port
    port = _port(env, master_port + 1 if env.get("TORCHELASTIC_RUN_ID") else master_port)
    host = env["MASTER_ADDR"]
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    kwargs: dict[str, Any] = {
        "coordinator_address": check_address(f"{host}:{port}", "MASTER_ADDR/MASTER_PORT")
    }
    if env.get("WORLD_SIZE") or env.get("RANK"):  # one process per launched worker
        keys = ("RANK", "WORLD_SIZE")
    elif env.get("NNODES") or env.get("NODE_RANK"):  # one process per node
        keys = ("NODE_RANK", "NNODES")
    else:
        raise DistributedEnvError(
            "MASTER_ADDR is set but neither WORLD_SIZE + RANK nor NNODES + NODE_RANK are"
        )
    for key in keys:
        if not env.get(key):
            raise DistributedEnvError(
                f"MASTER_ADDR and {' + '.join(k for k in keys if k != key)} are set but {key} is not"
            )
    rank, num = _int(env, keys[0], minimum=0), _int(env, keys[1], minimum=1)
    if keys[0] == "RANK" and env.get("LOCAL_WORLD_SIZE") and _int(env, "LOCAL_WORLD_SIZE", minimum=1) > 1:
        if not env.get("LOCAL_RANK"):
            raise DistributedEnvError("LOCAL_WORLD_SIZE > 1 but LOCAL_RANK is not set")
        kwargs["local_device_ids"] = [_int(env, "LOCAL_RANK", minimum=0)]
    _check_rank(rank, num, *keys)
    kwargs.update(num_processes=num, process_id=rank)
    return kwargs


def on_cloud_tpu_vm() -> bool:
    """A cheap guess of what JAX checks (libtpu installed and TPU chips attached: ``/dev/accel*`` on v2-v4,
    ``/dev/vfio/<n>`` on v5e and later)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(environ: Mapping[str, str] | None = None, *, force: bool = False) -> bool:
    """Call ``jax.distributed.initialize`` if ``force`` (``--distributed``) or the environment asks for it
    (``wants_distributed``); log one line: process index / count, local / global devices, platform.

    Returns whether JAX runs distributed. Must come before anything touches a device; a second call is a
    no-op.
    """
    import jax

    env = os.environ if environ is None else environ
    if not wants_distributed(force, env):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs, source = _resolve(env, tpu_vm=on_cloud_tpu_vm())
    jax.distributed.initialize(**(kwargs or {}))
    devices = jax.devices()
    logger.info(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices, platform %s",
        source,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        len(devices),
        devices[0].platform,
    )
    return True


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def describe_mesh(mesh: Any, *, max_processes: int = 8) -> str:
    """A few lines for the run log: the axis sizes, then per process its device ids and the index range it
    covers on every axis longer than 1, e.g.::

        mesh data=2 fsdp=4 tensor=1: 8 cpu devices, 2 processes x 4
          process 0: devices 0-3; data 0, fsdp 0-3
          process 1: devices 4-7; data 1, fsdp 0-3

    More than ``max_processes`` processes: the first ``max_processes - 2``, an ellipsis and the last.
    """
    import numpy as np

    devices = np.asarray(mesh.devices)
    names = tuple(mesh.axis_names)
    flat = devices.reshape(-1)
    by_process: dict[int, list[int]] = {}
    for d in flat:
        by_process.setdefault(int(d.process_index), []).append(int(d.id))
    counts = {len(v) for v in by_process.values()}
    per = f"{len(by_process)} process{'es' if len(by_process) > 1 else ''}"
    per += f" x {counts.pop()}" if len(counts) == 1 else ""
    sizes = " ".join(f"{n}={s}" for n, s in zip(names, devices.shape, strict=True))
    lines = [f"mesh {sizes}: {flat.size} {flat[0].platform} devices, {per}"]
    procs = sorted(by_process)
    if len(procs) > max_processes:
        procs = [*procs[: max_processes - 2], None, procs[-1]]
    for p in procs:
        if p is None:
            lines.append(f"  ... ({len(by_process) - max_processes + 1} more processes)")
            continue
        where = np.argwhere(np.vectorize(lambda d, p=p: d.process_index == p)(devices))
        spans = [
            f"{n} {_ranges(sorted(set(where[:, a].tolist())))}"
            for a, n in enumerate(names)
            if devices.shape[a] > 1
        ]
        lines.append(
            f"  process {p}: devices {_ranges(by_process[p])}" + (f"; {', '.join(spans)}" if spans else "")
        )
    return "\n".join(lines)
