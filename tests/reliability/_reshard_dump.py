"""``python _reshard_dump.py PLAN.json``: in one process (its device count set by the caller's ``XLA_FLAGS``),
run each stage command of the plan in turn (``jaxrlhf.cli.main(argv)``: the ``jaxrlhf`` entry point, the
same argv as the command line), then load each stage checkpoint of the plan onto a mesh of every device of
this process (``fsdp`` = all) and save its params / adapters / pytree extras as numpy, with
``<key>#shards``: how many distinct device shards each leaf has (1 = replicated).

``PLAN.json``: ``{"commands": [[argv...], ...], "stages": ["STAGE_DIR[:EXTRA,...]", ...], "out": "OUT.npz"}``.
A command that does not exit 0 stops the process with its exit status (its log is on stderr). One process
for every stage instead of one per stage: the restarts are the expensive part of the reshard test.
"""

import json
import sys

import jax
import numpy as np

from jaxrlhf import sharding, train


def dump(stages: list[str]) -> dict[str, np.ndarray]:
    """``{"<i>/<tree><path>": leaf, "<...>#shards": n, "#devices": n}`` of each ``STAGE_DIR[:EXTRAS]``."""
    mesh = sharding.make_mesh(1, -1, 1)
    arrays = {"#devices": np.asarray(len(jax.devices()))}
    for i, item in enumerate(stages):
        path, _, extras = item.partition(":")
        names = tuple(e for e in extras.split(",") if e)
        ck = train.load_stage(path, mesh=mesh, extras=names)
        trees = {"params": ck.params, "lora": ck.lora, **{n: ck.extras[n] for n in names}}
        for name, tree in trees.items():
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                key = f"{i}/{name}{jax.tree_util.keystr(kp)}"
                arrays[key] = np.asarray(jax.device_get(leaf))
                shards = {str(s.index) for s in leaf.addressable_shards}
                assert all(s.device in set(mesh.devices.flat) for s in leaf.addressable_shards), key
                arrays[key + "#shards"] = np.asarray(len(shards))
    return arrays


def main(plan_path: str) -> int:
    from jaxrlhf import cli

    with open(plan_path) as f:
        plan = json.load(f)
    for argv in plan["commands"]:
        rc = cli.main(argv)
        if rc != 0:
            print(f"_reshard_dump: {' '.join(argv)} exited {rc}", file=sys.stderr)
            return rc
    np.savez(plan["out"], **dump(plan["stages"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
