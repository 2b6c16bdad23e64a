"""SPViT's search (He et al., "Pruning Self-attentions into Convolutional Layers in Single Path") as a
:class:`Method`: ``config.mode = "spvit_search"``.

The student is :class:`alite_jax.models.spvit.SupernetViT` with the shapes of the dense DeiT that
``config.model`` names, started from a dense DeiT run's weights (``config.spvit.pretrained_workdir``: a
converted timm checkpoint or a trained run; empty: random init, for miniatures). Each training step
samples the gates (the ``"gates"`` rng stream, :meth:`SPViTSearch.apply_rngs`) and minimises

    CE(logits, targets) + lambda (T - F / 1e9)^2

with F = :func:`alite_jax.vit_costs.supernet_macs` of the current gate logits (SPViT's "FLOPs", which are
MACs; ``calculate_bops_loss`` in ziplab/SPViT ``SPViT_DeiT/models_pruning.py``), lambda =
``spvit.lambda_`` and T = ``spvit.target_gflops``. Two AdamW groups (ziplab/SPViT ``SPViT_DeiT/utils.py``,
``config/*_search.json``): the weights and ``head_probs`` at ``optimizer.lr`` (x batch / ``lr_batch``)
with ``optimizer.weight_decay`` on the kernels (parameters of rank >= 2, timm's convention: biases and
norms undecayed), and the gate logits (``msa_gate_logits``, ``ffn_gate_logits``) at ``spvit.arch_lr``
with no weight decay. Evaluation thresholds the gates (sigmoid(theta) > 0.5). After every epoch the
metrics row gets the thresholded architecture (each block's attention type and kept FFN width) and its
MACs; the summary gets the final one, which extraction turns into a compact model.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alite_jax import distill, run_dir, vit_costs
from alite_jax.distributed import make_mesh
from alite_jax.errors import ConfigError, MissingFileError
from alite_jax.methods.base import Method, State, learning_rate_schedule
from alite_jax.models import VisionTransformer, model_from_config
from alite_jax.models.spvit import SupernetViT
from alite_jax.models.zoo import VITS

GATE_NAMES = ("msa_gate_logits", "ffn_gate_logits")
FRESH_NAMES = GATE_NAMES + ("head_probs",)  # never taken from the dense run (nor are the BatchNorms)


def param_groups(params: Any) -> Any:
    """"arch" for the gate logits, "weights" for everything else (``head_probs`` included)."""
    return flax.traverse_util.path_aware_map(lambda path, _: "arch" if path[-1] in GATE_NAMES else "weights",
                                             flax.core.unfreeze(params))


def decay_mask(params: Any) -> Any:
    """Weight decay on parameters of rank >= 2 (kernels, embeddings, ``head_probs``), as timm's AdamW."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def search_optimizer(weights_lr: optax.ScalarOrSchedule, weight_decay: float,
                     arch_lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """SPViT's two AdamW groups: the weights (decayed per :func:`decay_mask`) and the gate logits (no
    decay)."""
    weights = optax.adamw(weights_lr, weight_decay=weight_decay, mask=decay_mask)
    arch = optax.adamw(arch_lr, weight_decay=0.0)
    return optax.multi_transform({"weights": weights, "arch": arch}, param_groups)


def gate_logits(params: Any, depth: int) -> tuple[jax.Array, list[jax.Array]]:
    """(msa (depth, 3), [ffn (hidden,)] * depth) of a supernet's parameter tree."""
    msa = jnp.stack([params[f"block{i}"]["attn"]["msa_gate_logits"] for i in range(depth)])
    return msa, [params[f"block{i}"]["ffn_gate_logits"] for i in range(depth)]


def merge_pretrained(params: Any, dense: Any) -> tuple[Any, list[str]]:
    """``params`` with every leaf the dense tree has at the same path and shape (not the gate logits nor
    ``head_probs``); returns the tree and the paths taken."""
    flat, taken = flax.traverse_util.flatten_dict(flax.core.unfreeze(params)), []
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(dense)).items():
        if path in flat and path[-1] not in FRESH_NAMES and flat[path].shape == value.shape:
            flat[path] = jnp.asarray(value, flat[path].dtype)
            taken.append("/".join(path))
    return flax.traverse_util.unflatten_dict(flat), taken


class SPViTSearch(Method):
    """SPViT's search of a DeiT supernet (see the module docstring)."""

    loss_terms = ("ce", "flops_loss", "gmacs", "total")

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        super().__init__(config, num_classes)
        self._dense: Any = None

    # Checks ---------------------------------------------------------------------------------------
    def dense_model(self) -> VisionTransformer:
        """The dense DeiT ``config.model`` names (the supernet takes its shapes)."""
        config = self.config
        if config.model.name not in VITS:
            raise ConfigError(f"mode 'spvit_search' searches a DeiT: config.model.name must be one of "
                              f"{VITS}, got {config.model.name!r}")
        return model_from_config(config.model, self.num_classes, image_size=config.data.image_size)

    def check(self) -> None:
        super().check()
        self.dense_model()
        s = self.config.spvit
        if not s.target_gflops > 0 or s.lambda_ < 0 or not s.arch_lr > 0:  # also in config.FIELD_RANGES
            raise ConfigError(f"config.spvit needs target_gflops > 0, lambda_ >= 0 and arch_lr > 0; got "
                              f"{s.target_gflops}, {s.lambda_}, {s.arch_lr}")

    def check_inputs(self) -> None:
        """The pretrained run: there, finished, a DeiT of the same shapes (the head may differ)."""
        workdir = self.config.spvit.pretrained_workdir
        if not workdir:
            return
        if not run_dir.is_finished_run(workdir):
            raise MissingFileError(f"no finished DeiT run at config.spvit.pretrained_workdir={workdir!r} (it "
                                   f"needs config.json and model/): convert a timm checkpoint (python -m "
                                   f"alite_jax.convert) or train one, or leave it empty for a random init")
        other = ml_collections.ConfigDict(run_dir.read_run_config(workdir))
        theirs = model_from_config(other.model, other.num_classes, image_size=other.data.image_size)
        ours = self.dense_model()
        shape = ("image_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio")
        if not isinstance(theirs, VisionTransformer) or any(getattr(theirs, k) != getattr(ours, k)
                                                            for k in shape):
            raise ConfigError(f"the run at {workdir} is {other.model.name} ({theirs}), not a DeiT of the "
                              f"searched shapes {({k: getattr(ours, k) for k in shape})}")

    # Models ---------------------------------------------------------------------------------------
    def student(self) -> nn.Module:
        d = self.dense_model()
        return SupernetViT(d.num_classes, image_size=d.image_size, patch_size=d.patch_size, dim=d.dim,
                           depth=d.depth, num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, dtype=d.dtype)

    def apply_rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        return {"gates": key}

    def prepare_params(self, params: Any, opt_state: Any) -> Any:
        workdir = self.config.spvit.pretrained_workdir
        if not workdir:
            return params
        if self._dense is None:  # read once (setup traces this twice: shapes, then values)
            _, variables = run_dir.load_model(workdir, make_mesh())
            self._dense = jax.device_get(variables["params"])
        merged, _ = merge_pretrained(params, self._dense)
        return merged

    # Loss -----------------------------------------------------------------------------------------
    def macs(self, params: Any) -> jax.Array:
        """The supernet's MACs at the current gate logits (differentiable in them)."""
        m = self.student()
        msa, ffn = gate_logits(params, m.depth)
        channels = params["patch_embed"]["kernel"].shape[2]
        return vit_costs.supernet_macs(msa, ffn, m.image_size, m.patch_size, m.dim, m.num_heads,
                                       self.num_classes, channels)

    def step_loss(self, params, logits, features, labels, teacher_out):
        s = self.config.spvit
        ce = distill.cross_entropy(logits, labels)
        macs = self.macs(params)
        flops = vit_costs.flops_loss(macs, s.target_gflops, s.lambda_)
        total = ce + flops
        return total, dict(ce=ce, flops_loss=flops, gmacs=jax.lax.stop_gradient(macs) / 1e9, total=total)

    def loss(self, logits, features, labels, teacher_out):
        raise NotImplementedError("SPViTSearch's loss reads the gate logits: the step calls step_loss")

    # Optimizer ------------------------------------------------------------------------------------
    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        return search_optimizer(learning_rate_schedule(self.config, steps_per_epoch),
                                self.config.optimizer.weight_decay, self.config.spvit.arch_lr)

    # End of epoch and summary ---------------------------------------------------------------------
    def architecture(self, params: Any, channels: int | None = None) -> dict[str, Any]:
        """The thresholded architecture of ``params``: per block the attention type and kept FFN width,
        and its MACs (G) next to the dense DeiT's."""
        m = self.student()
        msa, ffn = gate_logits(jax.device_get(params), m.depth)
        arch = vit_costs.arch_from_gates(msa, ffn)
        if channels is None:
            channels = int(np.shape(params["patch_embed"]["kernel"])[2])
        shapes = (m.image_size, m.patch_size, m.dim, m.num_heads, self.num_classes, channels)
        dense = vit_costs.vit_arch_macs(vit_costs.dense_arch(m.depth, m.dim, m.mlp_ratio), *shapes)
        return dict(arch_gmacs=vit_costs.vit_arch_macs(arch, *shapes) / 1e9, dense_gmacs=dense / 1e9,
                    arch_attention=[kind for kind, _ in arch], arch_ffn=[width for _, width in arch])

    def end_of_epoch(self, state: State, epoch: int, steps_per_epoch: int) -> tuple[State, dict[str, Any]]:
        return state, self.architecture(state["params"])

    def summary_fields(self, state: State, student_costs: Mapping[str, Any], image_size: int,
                       channels: int) -> dict[str, Any]:
        s = self.config.spvit
        return dict(distill="ce", structure="spvit_supernet", per_layer_density={},
                    target_gflops=s.target_gflops, lambda_=s.lambda_,
                    pretrained_workdir=s.pretrained_workdir,
                    **self.architecture(state["params"], channels))
