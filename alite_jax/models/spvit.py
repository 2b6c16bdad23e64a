"""SPViT's single-path supernet layers: a DeiT block whose attention slot searches MSA / 3x3 conv / 1x1 conv /
skip and whose FFN searches its hidden width.

SPViT is He et al., "Pruning Self-attentions into Convolutional Layers in Single Path" (public code:
ziplab/SPViT, ``SPViT_DeiT/models_pruning.py``: ``UnifiedAttention``, ``UnifiedMlp``,
``bernoulli_sample``). The layers here are written from the math of that code, in Linen;
docs/spvit_single_path.md gives every formula, its source, and where this module differs from the public
code and why.

* :func:`sample_gate`: a binary gate per logit theta. Training: a relaxed-Bernoulli sample of
  sigmoid(theta) at temperature 1 with the hard straight-through estimator (forward value
  1[theta + logistic noise > 0], gradient of the soft sample). Evaluation: 1[sigmoid(theta) > 0.5].
  Randomness only from the key passed in (the modules draw it from the Linen rng stream ``"gates"``).
* :class:`UnifiedAttention`: MSA with the dense ViT's ``qk`` (D -> 2D), ``v`` (D -> D), ``proj``
  (D -> D), plus two convolution branches built from the SAME ``v`` and ``proj`` weights: with
  A = softmax(head_probs / alpha, axis=heads) (heads x 9), the 3x3 conv's tap p = kh + 3 kw has kernel
  W_p = sum_h A[h, p] W_v^h (D -> head_dim), bias sum_p b_p, then BatchNorm(head_dim), ReLU and a
  Linear(head_dim -> D) of weight sum_p Proj_p (Proj_p = sum_h A[h, p] W_proj^h) plus proj's bias; the
  1x1 branch uses the centre tap p = 4 alone. The class token bypasses both conv branches. Three gates
  g, i = cumprod(g): out = i2 MSA + i1 (1 - i2) C3 + i0 (1 - i1)(1 - i2) C1.
* :class:`GatedMlp`: fc1 -> exact GELU -> times one gate per hidden unit -> fc2.
* :class:`SupernetBlock`, :class:`SupernetViT`: the dense ViT's block and model (the parameter names of
  :mod:`alite_jax.models.vit`), so a dense DeiT's params drop in; ``head_probs``, the BatchNorms and the
  gate logits (``msa_gate_logits``, ``ffn_gate_logits``: ordinary params, selectable by name) start fresh.

No training logic lives here (losses, optimisers, extraction); the FLOPs of a gate setting are counted
elsewhere from the gate logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from alite_jax.models.vit import (LAYER_NORM_EPSILON, classify, drop_path, drop_path_rates, embed_tokens,
                                  trunc_normal)

Dtype = Any

GATE_INIT = 1.5  # SPViT_DeiT/config/*_search.json: "theta": 1.5 (kernel_thresholds and ffn_thresholds)
HEAD_PROBS_ALPHA = 1e-2  # UnifiedAttention(alpha=1e-2): A = softmax(head_probs / alpha, axis=heads)
HEAD_PROBS_INIT = nn.initializers.ones  # UnifiedAttention: head_probs = torch.ones: A uniform over the heads
KERNEL_TAPS = 9  # the 3x3 window
CENTRE_TAP = 4  # p = kh + 3 kw at kh = kw = 1
BN_MOMENTUM = 0.9  # torch.nn.BatchNorm2d's momentum 0.1, in Flax's convention (1 - 0.1)
BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default

# The four settings of the three MSA gates g = (g0, g1, g2) (before the cumulative product).
MSA_SETTINGS = {
    "skip": (0.0, 0.0, 0.0),
    "conv1x1": (1.0, 0.0, 0.0),
    "conv3x3": (1.0, 1.0, 0.0),
    "msa": (1.0, 1.0, 1.0),
}


def tap_index(kh: int, kw: int) -> int:
    """Column p of A for the 3x3 kernel position (kh, kw): column-major, p = kh + 3 kw.

    ziplab/SPViT ``UnifiedAttention.conv_attmask_init`` numbers the window ``position = h1 + 3 * h2``
    with h1 the row (y) offset and h2 the column (x) offset, and its fine-tuning path reshapes the nine
    mixed kernels as (kw, kh) before permuting to PyTorch's (kh, kw): the same order.
    """
    return kh + 3 * kw


def relaxed_bernoulli_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    """(theta + L) / temperature with L standard logistic noise: the logit of a relaxed Bernoulli sample.

    ziplab/SPViT ``relaxed_bernoulli_logits`` computes log u - log(1 - u) + log p - log(1 - p) with
    p = sigmoid(theta) and u uniform, both clamped to [eps, 1 - eps] (torch's ``clamp_probs``). Here
    log p - log(1 - p) is theta itself, clipped to the same range (so the gradient vanishes where the
    clamp of p would make it vanish), which avoids the round trip through the sigmoid.
    """
    eps = float(jnp.finfo(jnp.float32).eps)
    bound = math.log((1.0 - eps) / eps)
    theta = jnp.clip(logits.astype(jnp.float32), -bound, bound)
    u = jax.random.uniform(key, theta.shape, jnp.float32, minval=eps, maxval=1.0 - eps)
    return (jnp.log(u) - jnp.log1p(-u) + theta) / temperature


def sample_gate(logits: jax.Array, key: jax.Array | None, train: bool, temperature: float = 1.0) -> jax.Array:
    """Binary gates of ``logits`` (float32, values exactly 0 or 1).

    ``train``: hard = 1[relaxed logit > 0], soft = sigmoid(relaxed logit); the value is hard and the
    gradient that of soft (hard + soft - stop_gradient(soft)); ziplab/SPViT ``bernoulli_sample``.
    Otherwise: 1[sigmoid(theta) > 0.5] (ziplab/SPViT ``single_path_init`` and ``UnifiedMlp.search_forward``
    in eval mode), deterministic, no gradient, and ``key`` is not used (may be None).
    """
    if not train:
        return (jax.nn.sigmoid(logits.astype(jnp.float32)) > 0.5).astype(jnp.float32)
    if key is None:
        raise ValueError("sample_gate(train=True) needs a PRNG key (the modules draw it from the 'gates' "
                         "rng stream: pass rngs={'gates': key} to apply)")
    z = relaxed_bernoulli_logits(logits, key, temperature)
    soft = jax.nn.sigmoid(z)
    hard = (z > 0.0).astype(jnp.float32)
    return hard + (soft - jax.lax.stop_gradient(soft))  # (soft - soft) is exactly 0: the value is hard


def msa_indicators(gates: jax.Array) -> jax.Array:
    """i = cumprod(g) with SPViT's "slow down" rule (ziplab/SPViT ``UnifiedAttention.single_path_init``).

    i0 "not skipped", i1 "3x3 rather than 1x1", i2 "MSA rather than 3x3". When i0 and i1 are both on,
    i0's own path is cut from the gradient (stop_gradient on that entry only: i1 and i2 still pass their
    gradients to g0 through the product); when i2 is on as well, i1's too.
    """
    chex.assert_shape(gates, (3,))
    i = jnp.cumprod(gates)
    on = i > 0.5
    i0 = jnp.where(on[0] & on[1], jax.lax.stop_gradient(i[0]), i[0])
    i1 = jnp.where(on[1] & on[2], jax.lax.stop_gradient(i[1]), i[1])
    return jnp.stack([i0, i1, i[2]])


def head_mix(head_probs: jax.Array, alpha: float = HEAD_PROBS_ALPHA) -> jax.Array:
    """A = softmax(head_probs / alpha) over the heads (axis 0): column p mixes the heads into tap p."""
    chex.assert_rank(head_probs, 2)
    return jax.nn.softmax(head_probs.astype(jnp.float32) / alpha, axis=0)


def conv_branch_weights(mix: jax.Array, v_kernel: jax.Array, v_bias: jax.Array,
                        proj_kernel: jax.Array) -> dict[str, jax.Array]:
    """The conv branches' weights from A (heads, 9) and the MSA's ``v`` and ``proj`` (Flax (in, out) kernels).

    Head h owns output channels [h hd, (h + 1) hd) of ``v`` and input rows [h hd, (h + 1) hd) of ``proj``.
    Returns ``kernel3`` (3, 3, D, hd) (HWIO, tap (kh, kw) = W_{kh + 3 kw}), ``bias3`` (hd,) = sum_p b_p,
    ``kernel1`` (D, hd) = W_4, ``bias1`` (hd,) = b_4, ``proj3`` (hd, D) = sum_p Proj_p and ``proj1``
    (hd, D) = Proj_4.
    """
    heads, taps = mix.shape
    d = v_kernel.shape[0]
    hd = d // heads
    chex.assert_shape(v_kernel, (d, d))
    chex.assert_shape(v_bias, (d,))
    chex.assert_shape(proj_kernel, (d, d))
    w = jnp.einsum("dhc,hp->pdc", v_kernel.reshape(d, heads, hd), mix)  # W_p: (9, D, hd)
    b = jnp.einsum("hc,hp->pc", v_bias.reshape(heads, hd), mix)  # b_p: (9, hd)
    proj = jnp.einsum("hco,hp->pco", proj_kernel.reshape(heads, hd, d), mix)  # Proj_p: (9, hd, D)
    # p = kh + 3 kw: reshaping the tap axis to (3, 3) gives (kw, kh); swap to HWIO's (kh, kw).
    kernel3 = w.reshape(3, 3, d, hd).transpose(1, 0, 2, 3)
    return {"kernel3": kernel3, "bias3": b.sum(0), "kernel1": w[CENTRE_TAP], "bias1": b[CENTRE_TAP],
            "proj3": proj.sum(0), "proj1": proj[CENTRE_TAP]}


def branch_batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
    """A conv branch's BatchNorm (PyTorch's BatchNorm2d defaults): batch statistics when ``train``.

    Created inside the calling module's ``nn.compact`` method, so it is that module's submodule ``name``.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                        name=name)


def conv_branch(x: jax.Array, weights: Mapping[str, jax.Array], proj_bias: jax.Array, kind: str,
                batch_norm: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """One conv branch on tokens ``x`` (B, 1 + HW, D), the HW patch tokens a square row-major grid.

    ``weights``: :func:`conv_branch_weights`' dict; ``kind`` "3x3" (zero-padded 3x3 cross-correlation
    with ``kernel3`` + ``bias3``) or "1x1" (``kernel1`` + ``bias1``); then ``batch_norm`` (hd channels),
    ReLU and the projection (``proj3`` / ``proj1``) plus ``proj_bias``. The class token bypasses the
    branch: its output is its input. Computed in ``x``'s dtype. Shared by the supernet and the unfolded
    compact model, so both run the same arithmetic.
    """
    chex.assert_rank(x, 3)
    b, n, d = x.shape
    side = math.isqrt(n - 1)
    if n < 2 or side * side != n - 1:
        raise ValueError(f"a conv branch takes a class token and a square grid of patch tokens; "
                         f"got {n} tokens")
    if kind not in ("3x3", "1x1"):
        raise ValueError(f"conv branch kind {kind!r} is not '3x3' or '1x1'")
    tag = kind[0]
    kernel, bias, proj = (weights[f"{k}{tag}"].astype(x.dtype) for k in ("kernel", "bias", "proj"))
    hd = bias.shape[0]
    grid = x[:, 1:].reshape(b, side, side, d)
    if kind == "3x3":
        y = jax.lax.conv_general_dilated(grid, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    else:
        y = grid @ kernel + bias
    y = nn.relu(batch_norm(y)).reshape(b, n - 1, hd) @ proj + proj_bias.astype(x.dtype)
    return jnp.concatenate([x[:, :1], y], axis=1)


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
    """A Linear initialised as the dense ViT's (truncated normal std 0.02, zero bias)."""
    return nn.Dense(features, dtype=dtype, kernel_init=trunc_normal, bias_init=nn.initializers.zeros,
                    name=name)


def _check_gates(gates: jax.Array | None, shape: tuple[int, ...], what: str) -> jax.Array | None:
    if gates is None:
        return None
    gates = jnp.asarray(gates, jnp.float32)
    if gates.shape != shape:
        raise ValueError(f"{what} gates must have shape {shape}; got {gates.shape}")
    return gates


class UnifiedAttention(nn.Module):
    """One DeiT block's attention slot in SPViT's supernet (ziplab/SPViT ``UnifiedAttention``, search mode).

    Input: the block's normalised tokens LN(x), (B, 1 + HW, D), the class token first and the HW patch
    tokens a square grid in row-major order. Output: (B, 1 + HW, D).

    Attributes:
      num_heads: attention heads (D must be a multiple); the conv branches have head_dim = D / heads
        channels.
      alpha: temperature of the head mixing A = softmax(head_probs / alpha, axis=heads).
      gate_init: initial value of the three ``msa_gate_logits``.
      dtype: computation dtype (parameters, the softmax, gates and A stay float32).

    ``__call__(x, train=False, gates=None)``: ``train`` samples the gates (rng stream ``"gates"``) and
    runs the BatchNorms on batch statistics (``batch_stats`` must be mutable); otherwise the gates are
    thresholded and the BatchNorms use their running statistics. ``gates`` (3,) overrides g = (g0, g1,
    g2) (values in {0, 1}; :data:`MSA_SETTINGS`), for tests and extraction. The indicators i =
    cumprod(g) are sown as ``intermediates/msa_indicators``.
    """

    num_heads: int
    alpha: float = HEAD_PROBS_ALPHA
    gate_init: float = GATE_INIT
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, gates: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(x, 3)
        b, n, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"the width D ({d}) must be a multiple of num_heads ({self.num_heads})")
        hd = d // self.num_heads
        side = math.isqrt(n - 1)
        if n < 2 or side * side != n - 1:
            raise ValueError(f"UnifiedAttention takes a class token and a square grid of patch tokens "
                             f"(1 + HW tokens, HW a square); got {n} tokens")
        gates = _check_gates(gates, (3,), "MSA")
        x = x.astype(self.dtype)

        # MSA, as the dense ViT's Attention.
        qk_layer, v_layer, proj_layer = (_dense(2 * d, "qk", self.dtype), _dense(d, "v", self.dtype),
                                         _dense(d, "proj", self.dtype))
        qk = qk_layer(x).reshape(b, n, 2, self.num_heads, hd)
        q, k = qk[:, :, 0], qk[:, :, 1]
        v = v_layer(x).reshape(b, n, self.num_heads, hd)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q * hd ** -0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        msa = proj_layer(jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d))

        # The conv branches, from v's and proj's weights mixed over the heads by A.
        head_probs = self.param("head_probs", HEAD_PROBS_INIT, (self.num_heads, KERNEL_TAPS), jnp.float32)
        v_params, proj_params = v_layer.variables["params"], proj_layer.variables["params"]
        w = conv_branch_weights(head_mix(head_probs, self.alpha), v_params["kernel"], v_params["bias"],
                                proj_params["kernel"])
        bn = lambda name: branch_batch_norm(train, self.dtype, name)  # noqa: E731
        c3 = conv_branch(x, w, proj_params["bias"], "3x3", bn("bn_3x3"))
        c1 = conv_branch(x, w, proj_params["bias"], "1x1", bn("bn_1x1"))

        theta = self.param("msa_gate_logits", nn.initializers.constant(self.gate_init), (3,), jnp.float32)
        if gates is None:
            gates = sample_gate(theta, self.make_rng("gates") if train else None, train)
        i = msa_indicators(gates)
        self.sow("intermediates", "msa_indicators", i)
        i = i.astype(self.dtype)
        out = i[2] * msa + i[1] * (1 - i[2]) * c3 + i[0] * (1 - i[1]) * (1 - i[2]) * c1
        chex.assert_shape(out, (b, n, d))
        return out


class GatedMlp(nn.Module):
    """SPViT's searched FFN (ziplab/SPViT ``UnifiedMlp``, search mode): fc1 -> GELU -> gates -> fc2.

    One gate per hidden unit (``ffn_gate_logits``, (hidden,), initialised to ``gate_init``: the public
    code gives ``UnifiedMlp`` the same theta as the MSA gates), sampled once per call and shared by
    every token of the batch. ``gates`` (hidden,) overrides the sample. GELU is the exact erf form
    (torch.nn.GELU's default), as the dense ViT.
    """

    hidden_features: int
    gate_init: float = GATE_INIT
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, gates: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(x, 3)
        d = x.shape[-1]
        gates = _check_gates(gates, (self.hidden_features,), "FFN")
        y = nn.gelu(_dense(self.hidden_features, "fc1", self.dtype)(x.astype(self.dtype)), approximate=False)
        theta = self.param("ffn_gate_logits", nn.initializers.constant(self.gate_init),
                           (self.hidden_features,), jnp.float32)
        if gates is None:
            gates = sample_gate(theta, self.make_rng("gates") if train else None, train)
        y = y * gates.astype(self.dtype)
        out = _dense(d, "fc2", self.dtype)(y)
        chex.assert_equal_shape([out, x])
        return out


class SupernetBlock(nn.Module):
    """A pre-norm DeiT block with SPViT's searched attention and FFN: x + UA(LN(x)); x + GatedMlp(LN(x)).

    Parameter names are the dense ViT block's (``norm1``, ``attn/{qk,v,proj}``, ``norm2``, ``fc1``,
    ``fc2``; :class:`GatedMlp` shares the block's scope) plus ``attn/head_probs``,
    ``attn/msa_gate_logits``, ``ffn_gate_logits`` and the ``attn/bn_3x3``, ``attn/bn_1x1`` BatchNorms.
    Both residual branches go through :func:`~alite_jax.models.vit.drop_path` at rate ``drop_path``.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    alpha: float = HEAD_PROBS_ALPHA
    gate_init: float = GATE_INIT
    dtype: Dtype = jnp.float32
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, msa_gates: jax.Array | None = None,
                 ffn_gates: jax.Array | None = None) -> jax.Array:
        chex.assert_rank(x, 3)
        d = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name=name)  # noqa: E731
        attn = UnifiedAttention(self.num_heads, self.alpha, self.gate_init, self.dtype, name="attn")
        x = x + drop_path(self, attn(norm("norm1")(x), train, msa_gates), self.drop_path, train)
        mlp = GatedMlp(int(d * self.mlp_ratio), self.gate_init, self.dtype, name="mlp")
        nn.share_scope(self, mlp)  # fc1, fc2 and ffn_gate_logits sit in the block, as the dense fc1, fc2
        return x + drop_path(self, mlp(norm("norm2")(x), train, ffn_gates), self.drop_path, train)


class SupernetViT(nn.Module):
    """DeiT with :class:`SupernetBlock` blocks: the dense ViT's names and layout, SPViT's search space.

    ``patch_embed`` (Conv, kernel = stride = patch), ``cls_token``, ``pos_embed``, ``block{i}``, ``norm``,
    ``head`` as :class:`alite_jax.models.vit.VisionTransformer`. ``__call__(x, train=False,
    msa_gates=None, ffn_gates=None)`` returns ``(logits, features)``, ``features`` every block's output
    tokens; ``msa_gates`` (depth, 3) and ``ffn_gates`` (depth, hidden) override the gates of every block.
    Training needs the ``"gates"`` rng stream and a mutable ``batch_stats``, and with ``drop_path_rate``
    > 0 the ``"dropout"`` stream (stochastic depth as the dense ViT's).
    """

    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    alpha: float = HEAD_PROBS_ALPHA
    gate_init: float = GATE_INIT
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, msa_gates: jax.Array | None = None,
                 ffn_gates: jax.Array | Sequence[jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        chex.assert_rank(x, 4)
        if x.shape[1:3] != (self.image_size, self.image_size) or self.image_size % self.patch_size:
            raise ValueError(f"this supernet takes {self.image_size}x{self.image_size} images (a multiple "
                             f"of the patch size {self.patch_size}); got {x.shape[1]}x{x.shape[2]}")
        x = embed_tokens(self, x, self.patch_size, self.dim, self.dtype)
        features = []
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = SupernetBlock(self.num_heads, self.mlp_ratio, self.alpha, self.gate_init, self.dtype, rate,
                              name=f"block{i}")(
                x, train, None if msa_gates is None else msa_gates[i],
                None if ffn_gates is None else ffn_gates[i])
            features.append(x)
        return classify(x, self.num_classes, self.dtype), tuple(features)


def supernet_of(dense: nn.Module) -> SupernetViT:
    """The supernet of a dense :class:`alite_jax.models.vit.VisionTransformer`'s shapes (and dtype): what
    SPViT's search trains, starting from that DeiT's weights (with its drop path rate)."""
    return SupernetViT(dense.num_classes, image_size=dense.image_size, patch_size=dense.patch_size,
                       dim=dense.dim, depth=dense.depth, num_heads=dense.num_heads, mlp_ratio=dense.mlp_ratio,
                       drop_path_rate=dense.drop_path_rate, dtype=dense.dtype)
