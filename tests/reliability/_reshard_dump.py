"""``python _reshard_dump.py OUT.npz STAGE_DIR[:EXTRA,...] ...``: load each stage checkpoint onto a mesh of
every device of this process (``fsdp`` = all) and save its params / adapters / pytree extras as numpy, with
``<key>#shards``: how many distinct device shards each leaf has (1 = replicated)."""

import sys

import jax
import numpy as np

from jaxrlhf import sharding, train


def main(out, *stages):
    mesh = sharding.make_mesh(1, -1, 1)
    arrays = {"#devices": np.asarray(len(jax.devices()))}
    for i, item in enumerate(stages):
        path, _, extras = item.partition(":")
        ck = train.load_stage(path, mesh=mesh, extras=tuple(e for e in extras.split(",") if e))
        trees = {"params": ck.params, "lora": ck.lora, **{n: ck.extras[n] for n in extras.split(",") if n}}
        for name, tree in trees.items():
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                key = f"{i}/{name}{jax.tree_util.keystr(kp)}"
                arrays[key] = np.asarray(jax.device_get(leaf))
                shards = {str(s.index) for s in leaf.addressable_shards}
                assert all(s.device in set(mesh.devices.flat) for s in leaf.addressable_shards), key
                arrays[key + "#shards"] = np.asarray(len(shards))
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
