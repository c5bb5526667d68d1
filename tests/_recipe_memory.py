"""Per-device memory of a stage recipe at full size, from abstract shapes only (``jax.eval_shape``).

Used by ``tests/test_recipes.py``. Every parameter-like term is exact for the recipe's mesh: the abstract
parameter tree of the model (``models.abstract_params``) is split by the logical-axis rules
(``sharding.logical_to_spec``) over an ``AbstractMesh`` of the target's device count, and each leaf counts
``prod(shape_i / mesh size of the axes of dim i) * itemsize``. Activations are an estimate. Notation: ``W`` =
a model's parameter bytes on one device, ``n`` = trainable elements on one device, ``s`` = their itemsize,
``c`` = the compute dtype's itemsize, ``E`` hidden, ``L`` layers, ``F`` MLP width, ``H`` heads, ``HD = H *
head_dim``, ``KD = kv_heads * head_dim``, ``V`` vocab (split over ``tensor``), ``b`` rows on one device (of a
micro-batch: rows / (grad_accum * data * fsdp)), ``T`` tokens per row (T5: encoder S and decoder T apart)::

    total = held + max(phases)
    held          params n*s + optimizer state (AdamW: m in mu_dtype + v like the params; other optimizers:
                  eval_shape of their init), at the params' sharding; LoRA: + the frozen base W;
                  DPO on the fly (full): + the reference copy W
    train step    n*c (compute copy of f32 params) + n*s gradients (+ 4n f32 accumulator if grad_accum > 1)
                  + L*b*T*a(remat) + b*T*a_layer (one layer being recomputed) + attention scores + LM head
                  a_layer = c*(6E + 2HD + 2KD + 3F)  (2F without a gated MLP: every tensor a layer keeps)
                  a(none) = a_layer, a(save_dots) = c*(3E + 2HD + 2KD + 2F), a(full) = c*E;  T5 decoder
                  layers add cross-attention c*(E + 2HD) per decoder token and c*2KD per encoder token
    scores        GPU (cuDNN flash attention for bf16): none; TPU / plain attention: b*H*T*T * (L*k + 12 + c)
                  with k = 4 + c (none), 4 (save_dots: the f32 scores are a matmul output), 0 (full)
    LM head       decoder-only SFT / DPO: one chunk of f32 logits and their gradient, 2*4*V*(b*chunk) with
                  b*chunk ~ losses.DEFAULT_CHUNK_TOKENS / (data * fsdp); T5 and PPO: 3*4*b*T*V
    eval          one forward pass over data.batch_size rows (eval batches are not micro-batched): per row
                  T*a_layer + plain scores H*T*T*(8 + c) + forward logits;  DPO: also the reference pass
                  over train.reference_batch_size pairs;  RM / DPO rows: chosen + rejected = 2 per pair
    PPO           held: W (reference, or the LoRA base) + policy and critic states + the reward model W (0
                  when it is an adapter set on the policy's base) + a merged critic backbone W (only when
                  critic.init=reward over a LoRA RM); phases, with r = prompts * n / (data * fsdp):
                  generation = KV cache r*(P+N)*L*2*KD*c + a compute copy of an f32 policy + plain prefill
                  scoring    = forward logits 2*4*r*N*V + one forward pass over the r rows
                  update     = both gradients + policy and critic activations without remat (the PPO
                               forward passes take no remat) + 3*4*b*N*V logits

Samples (``samples.num`` <= 32 prompts) are left out: their KV cache is small next to these.

The check is ``total <= 0.9 * HBM``: 10% is left for what the estimate does not model (XLA temporaries,
fragmentation, the runtime's own reservation). Calibration: for the 1.24B Llama shape of
``benchmarks/RESULTS.md`` (one H200, f32 master weights, fused attention) the estimate gives 45.1 / 45.1 /
49.7 / 41.2 / 63.8 / 15.7 GiB where the device measured 38.8 / 38.7 / 43.3 / 34.5 / 51.7 / 15.0 GiB (SFT step
8 x 2048; DPO 8 pairs x 1024, reference precomputed / on the fly; RM 8 pairs x 1024; PPO full and LoRA, 64
prompts x (128 + 128)): 5-23% above, never below. TPU memory is not calibrated (no TPU measurements).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from jaxrlhf import lora, models, sharding, train
from jaxrlhf.losses._chunked import DEFAULT_CHUNK_TOKENS
from jaxrlhf.models.known_specs import known_spec

GiB = 2**30
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine a recipe is written for: JAX devices, processes (hosts) and HBM per device."""

    devices: int
    hosts: int
    hbm: int
    gpu: bool  # cuDNN flash attention for bf16 compute (attention_impl auto / fused); TPU: plain scores


TARGETS = {
    "v5e-8": Target(devices=8, hosts=1, hbm=16 * GiB, gpu=False),
    "v4-32": Target(devices=16, hosts=4, hbm=32 * GiB, gpu=False),  # 16 chips (megacore: one device each)
    "8xH100": Target(devices=8, hosts=1, hbm=80 * GiB, gpu=True),
    "1xH100": Target(devices=1, hosts=1, hbm=80 * GiB, gpu=True),
}


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def abstract_mesh(mesh_cfg: Any, devices: int) -> AbstractMesh:
    """The ``(data, fsdp, tensor)`` mesh ``sharding.make_mesh`` would build on ``devices`` devices."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        assert devices % known == 0, f"{devices} devices do not split into mesh {sizes}"
        sizes[sizes.index(-1)] = devices // known
    assert math.prod(sizes) == devices, f"mesh {sizes} has {math.prod(sizes)} devices, the target {devices}"
    return AbstractMesh(tuple(sizes), sharding.MESH_AXES)


def batch_shards(mesh: AbstractMesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _axis_size(mesh: AbstractMesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in names)


def device_bytes(shapes: Any, axes: Any, mesh: AbstractMesh) -> int:
    """Bytes of one device's shards of ``shapes`` laid out by the logical ``axes``."""

    def one(a, x):
        spec = tuple(sharding.logical_to_spec(a, mesh, x.shape))
        spec += (None,) * (len(x.shape) - len(spec))
        local = [d // _axis_size(mesh, s) for d, s in zip(x.shape, spec, strict=True)]
        return math.prod(local) * x.dtype.itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, axes, shapes, is_leaf=_is_axes)))


def tree_bytes(shapes: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def architecture(hub_id: str) -> Any:
    """The known spec without its token ids: what parameter shapes depend on (the cache key below, so that
    e.g. Llama-3-8B and its Instruct model, which differ in the EOS id only, are built once)."""
    spec = known_spec(hub_id)
    return spec.replace(bos_token_id=None, eos_token_ids=(), pad_token_id=None, decoder_start_token_id=None)


def _in_dtype(shapes: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), shapes)


@functools.cache
def _abstract(arch: Any) -> tuple[Any, Any]:
    return models.abstract_params(arch, jnp.float32), models.param_axes(arch)


def _lora_key(lcfg: lora.LoraConfig | None) -> Any:
    """What adapter shapes depend on (not alpha or dropout)."""
    return None if lcfg is None else lora.LoraConfig(rank=lcfg.rank, targets=lcfg.targets)


@functools.cache
def _trees(arch: Any, lcfg: lora.LoraConfig | None) -> tuple[Any, Any]:
    """``(abstract f32 trainable tree, its logical axes)``: the params (``lcfg`` None) or the adapters."""
    params, axes = _abstract(arch)
    if lcfg is None:
        return params, axes
    shapes = jax.eval_shape(lambda r: lora.init(arch, params, lcfg, r), jax.random.key(0))
    return shapes, lora.param_axes(axes, shapes)


@functools.cache
def _layout(arch: Any, lcfg: Any, mesh: AbstractMesh) -> tuple[int, int, tuple[str, ...]]:
    """``(elements, elements on one device, dimensions left replicated)`` of a trainable tree on ``mesh``."""
    shapes, axes = _trees(arch, lcfg)
    total = tree_bytes(shapes) // 4
    mine = device_bytes(shapes, axes, mesh) // 4
    return total, mine, tuple(sharding.unsharded_dims(axes, shapes, mesh))


def unsharded(hub_id: str, dtype: str, lcfg: lora.LoraConfig | None, mesh: AbstractMesh) -> list[str]:
    """Parameter (and adapter) dimensions that would be replicated because they do not divide the mesh."""
    arch = architecture(hub_id)
    out = list(_layout(arch, None, mesh)[2])
    if lcfg is not None:
        out += _layout(arch, _lora_key(lcfg), mesh)[2]
    return out


@functools.cache
def _optimizer_bytes(arch: Any, dtype: str, lcfg: Any, name: str, mu_dtype: Any, momentum: float) -> int:
    shapes = _in_dtype(_trees(arch, lcfg)[0], dtype)
    if name == "adamw":  # optax.scale_by_adam: m in mu_dtype (default: the params'), v like the params
        return tree_bytes(_in_dtype(shapes, mu_dtype or dtype)) + tree_bytes(shapes)
    optim = train.OptimConfig(name=name, mu_dtype=mu_dtype, momentum=momentum)
    return tree_bytes(jax.eval_shape(train.make_optimizer(optim).init, shapes))


def optimizer_bytes(hub_id: str, dtype: str, lcfg: lora.LoraConfig | None, optim: train.OptimConfig) -> int:
    """Bytes of the whole optimizer state over the trainable tree: AdamW's m and v, else ``eval_shape`` of
    the optimizer's init (Adafactor's factored moments); the learning rate, schedule, clipping add none."""
    arch = architecture(hub_id)
    return _optimizer_bytes(arch, dtype, _lora_key(lcfg), optim.name, optim.mu_dtype, optim.momentum)


def train_state(
    hub_id: str,
    dtype: str,
    lcfg: lora.LoraConfig | None,
    optim: train.OptimConfig,
    c: int,
    mesh: AbstractMesh,
) -> dict[str, int]:
    """Per-device bytes of a train state over the model (``lcfg`` None) or its adapters (module docstring)."""
    total, n, _ = _layout(architecture(hub_id), _lora_key(lcfg), mesh)
    s = jnp.dtype(dtype).itemsize
    return {
        "params": n * s,
        "compute copy": n * c if s != c else 0,
        "gradients": n * s + (4 * n if optim.grad_accum > 1 else 0),
        "optimizer": optimizer_bytes(hub_id, dtype, lcfg, optim) * n // total,
    }


def layer_bytes(spec: Any, remat: str, c: int) -> tuple[int, int]:
    """``(a(remat), a_layer)``: bytes per token and layer kept for the backward pass, and one layer's all."""
    e, f = spec.hidden_size, spec.intermediate_size
    hd, kd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    full = c * (6 * e + 2 * hd + 2 * kd + (3 if spec.gated_mlp else 2) * f)
    kept = {"none": full, "save_dots": c * (3 * e + 2 * hd + 2 * kd + (2 if spec.gated_mlp else 1) * f)}
    return kept.get(remat, c * e), full


def stack_activations(spec: Any, remat: str, c: int, rows: float, enc_len: int, dec_len: int) -> float:
    """Activation bytes of a forward + backward pass over ``rows`` rows on one device (module docstring).

    Decoder-only: ``dec_len`` tokens per row; T5: ``enc_len`` encoder and ``dec_len`` decoder tokens."""
    a, a_layer = layer_bytes(spec, remat, c)
    working = 0 if remat == "none" else a_layer
    if not spec.is_encoder_decoder:
        return rows * dec_len * (spec.num_layers * a + working)
    hd, kd, e = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.hidden_size
    cross_dec, cross_enc = (0, 0) if remat == "full" else (c * (e + 2 * hd), c * 2 * kd)
    enc = rows * enc_len * spec.num_layers * a
    dec = rows * spec.num_decoder_layers * (dec_len * (a + cross_dec) + enc_len * cross_enc)
    return enc + dec + rows * (enc_len + dec_len) * working


def fused_attention(model_cfg: Any, target: Target) -> bool:
    """What ``attention.resolve_attention_impl`` picks: cuDNN flash attention on GPU for 16-bit compute."""
    c = jnp.dtype(model_cfg.compute_dtype or model_cfg.dtype)
    return target.gpu and model_cfg.attention_impl != "plain" and c in (jnp.bfloat16, jnp.float16)


def attention_scores(spec: Any, remat: str, c: int, rows: float, enc_len: int, dec_len: int) -> float:
    """Plain attention's ``[B, H, T, S]`` scores (f32) and probabilities (compute dtype) of a forward +
    backward pass: kept per layer (none: both; save_dots: the f32 scores, a matmul output; full: nothing)
    plus one layer's working set (scores, softmax, its gradient in f32 + the probabilities)."""
    kept = {"none": 4 + c, "save_dots": 4}.get(remat, 0)
    h = spec.num_heads
    if not spec.is_encoder_decoder:
        return rows * h * dec_len * dec_len * (spec.num_layers * kept + 12 + c)
    enc, dec = enc_len * enc_len, dec_len * (dec_len + enc_len)
    return (
        rows
        * h
        * (spec.num_layers * enc * kept + spec.num_decoder_layers * dec * kept + max(enc, dec) * (12 + c))
    )


def vocab_shard(spec: Any, mesh: AbstractMesh) -> int:
    t = mesh.shape["tensor"]
    return spec.vocab_size // t if spec.vocab_size % t == 0 else spec.vocab_size


def chunked_head(spec: Any, global_rows: int, length: int, mesh: AbstractMesh) -> float:
    """The chunked LM head's f32 logits and their gradient for one chunk (``losses._chunked._layout``)."""
    k = -(-length // max(1, DEFAULT_CHUNK_TOKENS // max(global_rows, 1)))
    chunk = -(-length // k)
    return 2 * 4 * (global_rows / batch_shards(mesh)) * chunk * vocab_shard(spec, mesh)


def full_logits(spec: Any, rows: float, length: int, mesh: AbstractMesh, copies: int) -> float:
    return copies * 4 * rows * length * vocab_shard(spec, mesh)


def kv_cache(spec: Any, rows: float, length: int, c: int) -> float:
    layers = spec.num_decoder_layers if spec.is_encoder_decoder else spec.num_layers
    return rows * length * layers * 2 * spec.num_kv_heads * spec.head_dim * c


def report(terms: dict[str, float], hbm: int) -> str:
    lines = [f"  {k:<28} {v / GiB:8.2f} GiB" for k, v in terms.items() if v]
    total = sum(terms.values())
    lines.append(f"  {'total':<28} {total / GiB:8.2f} GiB of {HEADROOM} * {hbm / GiB:.0f} GiB")
    return "\n".join(lines)


def _sequence(spec: Any, stage: str, data: Any) -> tuple[int, int]:
    """``(encoder tokens, decoder tokens)`` per row of a training batch (encoder 0 for decoder-only)."""
    if not spec.is_encoder_decoder:
        return 0, data.max_length
    if stage == "sft":  # seq2seq: inputs cut to max_prompt_length, targets padded to max_length
        return data.max_prompt_length or data.max_length, data.max_length
    if stage == "rm":  # the encoder reads prompt + response, the decoder one start token
        return data.max_length, 1
    return data.max_length, data.max_length  # DPO: pair rows as seq2seq tensors of the same length


def forward_only(spec: Any, c: int, rows: float, enc: int, dec: int, fused: bool) -> float:
    """A forward pass without gradients (eval, scoring, reference log-probs): one layer's tensors at a time,
    plain attention's scores, softmax and probabilities of that layer."""
    _, a_layer = layer_bytes(spec, "none", c)
    scores = 0
    if not fused:
        scores = rows * spec.num_heads * (dec * dec + enc * enc + enc * dec) * (8 + c)
    return rows * (enc + dec) * a_layer + scores


def estimate(
    stage: str, cfg: Any, hub_id: str, mesh: AbstractMesh, target: Target, rm_cfg: Any = None
) -> dict[str, float]:
    """Per-device bytes by term of one stage config on ``mesh`` (the formulas of the module docstring):
    what lives through the run, plus the largest of the phases (train step, eval / scoring forward passes,
    generation).

    ``rm_cfg``: the RM recipe whose stage PPO's ``reward.path`` names (its LoRA-ness decides sharing)."""
    m, d = cfg.model, cfg.data
    c = jnp.dtype(m.compute_dtype or m.dtype).itemsize
    spec = known_spec(hub_id)
    w = _layout(architecture(hub_id), None, mesh)[1] * jnp.dtype(m.dtype).itemsize
    shards, fused = batch_shards(mesh), fused_attention(m, target)

    def state(prefix: str, lcfg: Any, optim: Any) -> tuple[dict[str, float], float]:
        """``(held through the run, held during a step)`` of one train state."""
        t = train_state(hub_id, m.dtype, lcfg, optim, c, mesh)
        held = {f"{prefix} params": t["params"], f"{prefix} optimizer": t["optimizer"]}
        return held, t["compute copy"] + t["gradients"]

    def activations(remat: str, rows: float, enc: int, dec: int) -> float:
        scores = 0 if fused else attention_scores(spec, remat, c, rows, enc, dec)
        return stack_activations(spec, remat, c, rows, enc, dec) + scores

    def peak(terms: dict[str, float], phases: dict[str, float]) -> dict[str, float]:
        name = max(phases, key=phases.get)
        return {**terms, f"peak phase: {name}": phases[name]}

    terms: dict[str, float] = {}
    if stage in ("sft", "rm", "dpo"):
        if cfg.lora is not None:
            terms["frozen base"] = w
        held, step_state = state("trainable", cfg.lora, cfg.optim)
        terms.update(held)
        if stage == "dpo" and cfg.train.reference == "on_the_fly" and cfg.lora is None:
            terms["reference copy"] = w
        pair = 1 if stage == "sft" else 2
        global_rows = pair * d.batch_size // cfg.optim.grad_accum
        rows = global_rows / shards
        enc, dec = _sequence(spec, stage, d)

        def head(rows_: float, global_rows_: int, copies: int) -> float:
            if stage == "rm":
                return 0
            if spec.is_encoder_decoder:
                return full_logits(spec, rows_, dec, mesh, copies=copies)
            return chunked_head(spec, global_rows_, dec, mesh)

        step = step_state + activations(m.remat, rows, enc, dec) + head(rows, global_rows, 3)
        # eval batches are data.batch_size rows in one forward pass (no micro-batches)
        eval_rows = pair * d.batch_size / shards
        copy = train_state(hub_id, m.dtype, cfg.lora, cfg.optim, c, mesh)["compute copy"]
        evaluation = copy + forward_only(spec, c, eval_rows, enc, dec, fused)
        evaluation += head(eval_rows, pair * d.batch_size, 2)
        phases = {"train step": step, "eval": evaluation}
        if stage == "dpo" and cfg.train.reference == "precompute":
            ref_pairs = cfg.train.reference_batch_size or d.batch_size
            phases["reference pass"] = forward_only(spec, c, 2 * ref_pairs / shards, enc, dec, fused)
            phases["reference pass"] += head(2 * ref_pairs / shards, 2 * ref_pairs, 2)
        return peak(terms, phases)

    assert stage == "ppo", stage
    shared_rm = rm_cfg is not None and rm_cfg.lora is not None and rm_cfg.model.path == cfg.model.path
    init = cfg.critic.init if cfg.critic.init != "auto" else ("reward" if cfg.reward.path else "policy")
    terms["base / reference"] = w
    held, policy_step = state("policy", cfg.lora, cfg.optim)
    terms.update(held)
    terms["reward model"] = 0 if rm_cfg is None or shared_rm else w
    # critic.init=reward over a LoRA RM merges it into a new backbone; over a full RM it is the RM's arrays
    terms["critic backbone"] = w if init == "reward" and rm_cfg is not None and rm_cfg.lora is not None else 0
    held, critic_step = state("critic", cfg.critic.lora, cfg.critic_optim)
    terms.update(held)
    hp, sampling = cfg.ppo, cfg.rollout.sampling
    p, n = d.max_prompt_length or d.max_length, sampling.max_new_tokens
    rows = d.batch_size * sampling.n / shards
    s = jnp.dtype(m.dtype).itemsize
    enc, dec = (p, n) if spec.is_encoder_decoder else (0, p + n)
    prefill = 0 if fused else rows * spec.num_heads * p * p * (8 + c)
    cast = w * c // s if cfg.lora is None and s != c else 0
    generation = kv_cache(spec, rows, p + n, c) + cast + prefill
    scoring = full_logits(spec, rows, n, mesh, copies=2) + forward_only(spec, c, rows, enc, dec, fused)
    micro = rows / (hp.num_minibatches * hp.grad_accum)  # the PPO forward passes run without remat
    update = policy_step + critic_step + 2 * activations("none", micro, enc, dec)
    update += full_logits(spec, micro, n, mesh, copies=3)
    return peak(terms, {"generation": generation, "scoring": scoring, "update": update})
