"""SPViT (He et al., "Pruning Self-attentions into Convolutional Layers in Single Path") as two
:class:`Method` s: the search (``config.mode = "spvit_search"``, :class:`SPViTSearch`) and the fine-tuning
of the architecture it found (``config.mode = "spvit_finetune"``, :class:`SPViTFinetune`).

Search
------

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
MACs; the summary gets the final one, and the run directory its ``architecture.json``
(:func:`alite_jax.compact.spvit.extract_architecture`, with the search's target and lambda).

Fine-tuning
-----------
The student is :class:`alite_jax.models.spvit_compact.CompactViT` of ``config.spvit.architecture`` (an
``architecture.json`` or the search run directory holding one) in SPViT's fine-tuning form (unfolded:
conv blocks keep v, proj and ``head_probs`` and mix their kernel at run time; folding is for inference),
started, as SPViT does (ziplab/SPViT ``SPViT_DeiT/main_pruning.py``: the fine-tuning restarts from the
pretrained DeiT), from the dense DeiT run ``config.spvit.pretrained_workdir``: every weight of the dense
model it has (the kept FFN units gathered), ``head_probs`` and the BatchNorms fresh. Its loss is
cross-entropy with the data config's soft targets (label smoothing, Mixup/CutMix), or with
``spvit.distill = "hard"`` DeiT's hard distillation from the CNN teacher run ``config.teacher.workdir``
(:func:`alite_jax.distill.hard_distillation_loss`, weight ``spvit.distill_alpha`` = 0.5, no distillation
token); one AdamW group (:func:`alite_jax.methods.base.adamw`, timm's decay convention). With
``sparsity.density < 1`` AttentionLite's sparse learning prunes it on top
(:func:`alite_jax.methods.sparse.sparse_optimizer` around the AdamW, whose first moment is the
momentum that regrows weights, and a prune/regrow round after every epoch but the last): both papers'
compressions in one run.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alite_jax import distill, run_dir, sparsity, vit_costs
from alite_jax.config import Range
from alite_jax.distributed import make_mesh
from alite_jax.errors import ConfigError, MissingFileError, RunDirError
from alite_jax.methods import registry
from alite_jax.methods.base import Method, State
from alite_jax.methods.optim import adamw, decay_mask, learning_rate_schedule
from alite_jax.methods.sparse import SparseLearning
from alite_jax.methods.teacher import TeacherRun
from alite_jax.models import VisionTransformer, count_params, model_from_config
from alite_jax.compact import spvit as compact_spvit
from alite_jax.models import spvit_compact
from alite_jax.models.spvit import SupernetViT, supernet_of
from alite_jax.models.zoo import VITS

DISTILL_MODES = ("none", "hard")  # spvit.distill of the fine-tuning
SHAPE_FIELDS = ("image_size", "patch_size", "dim", "depth", "num_heads", "mlp_ratio")

GATE_NAMES = ("msa_gate_logits", "ffn_gate_logits")
FRESH_NAMES = GATE_NAMES + ("head_probs",)  # never taken from the dense run (nor are the BatchNorms)


def param_groups(params: Any) -> Any:
    """"arch" for the gate logits, "weights" for everything else (``head_probs`` included)."""
    return flax.traverse_util.path_aware_map(lambda path, _: "arch" if path[-1] in GATE_NAMES else "weights",
                                             flax.core.unfreeze(params))


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


def dense_vit(config: ml_collections.ConfigDict, num_classes: int, dtype: str = "") -> VisionTransformer:
    """The dense DeiT ``config.model`` names (the supernet and the found architecture take its shapes)."""
    if config.model.name not in VITS:
        raise ConfigError(f"mode {config.mode!r} works on a DeiT: config.model.name must be one of {VITS}, "
                          f"got {config.model.name!r}")
    return model_from_config(config.model, num_classes, dtype, image_size=config.data.image_size)


def check_pretrained_run(workdir: str, dense: VisionTransformer) -> None:
    """The dense DeiT run SPViT starts from: there, finished, of ``dense``'s shapes (the head may differ)."""
    if not run_dir.is_finished_run(workdir):
        raise MissingFileError(f"no finished DeiT run at config.spvit.pretrained_workdir={workdir!r} (it "
                               f"needs config.json and model/): convert a timm checkpoint (python -m "
                               f"alite_jax.convert) or train one, or leave it empty for a random init")
    other = ml_collections.ConfigDict(run_dir.read_run_config(workdir))
    theirs = registry.run_model(workdir)
    if not isinstance(theirs, VisionTransformer) or any(getattr(theirs, k) != getattr(dense, k)
                                                        for k in SHAPE_FIELDS):
        raise ConfigError(f"the run at {workdir} is {other.model.name} ({type(theirs).__name__}, mode "
                          f"{other.get('mode')!r}), not a dense DeiT of the shapes "
                          f"{({k: getattr(dense, k) for k in SHAPE_FIELDS})}")


def read_pretrained_params(workdir: str) -> Any:
    """The dense run's parameters, on the host."""
    _, variables = registry.load_run(workdir, make_mesh())
    return jax.device_get(variables["params"])


def read_found_architecture(path: str) -> dict[str, Any]:
    """``spvit.architecture``: an architecture file, or a (search) run directory holding one."""
    if not path:
        raise ConfigError("mode 'spvit_finetune' needs config.spvit.architecture: the architecture.json a "
                          "search wrote, or its run directory")
    file = os.path.join(path, compact_spvit.ARCHITECTURE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise MissingFileError(f"no architecture at config.spvit.architecture={path!r} ({file} does not "
                               f"exist): run the search (mode 'spvit_search') to the end first")
    try:
        return compact_spvit.load_architecture(file)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{file} is not an SPViT architecture: {e}") from e


def dense_macs_params(dense: VisionTransformer, in_chans: int) -> tuple[int, int]:
    """(MACs, params) of the dense DeiT by SPViT's count."""
    shapes = dict(image_size=dense.image_size, patch_size=dense.patch_size, dim=dense.dim,
                  num_heads=dense.num_heads, num_classes=dense.num_classes, in_chans=in_chans)
    arch = vit_costs.dense_arch(dense.depth, dense.dim, dense.mlp_ratio)
    return vit_costs.vit_arch_macs(arch, **shapes), vit_costs.vit_arch_params(arch, **shapes)


class SPViTMethod(Method):
    """What SPViT's search and fine-tuning share: the ``spvit`` config section, the dense DeiT
    ``config.model`` names (whose shapes the supernet and the found architecture take) and its pretrained
    parameters (``spvit.pretrained_workdir``), read outside ``jit`` as the initial inputs."""

    # spvit (docs/spvit_single_path.md). Both modes: the dense DeiT run they start from ("": random
    # init). Search: the FLOPs loss lambda_ (T - F / 1e9)^2 with T = target_gflops (G MACs, SPViT's
    # "FLOPs"), the gate logits' own AdamW lr (no weight decay). Fine-tuning: the architecture found (a
    # search's run directory or its architecture.json), distill "none" or "hard" (DeiT's hard
    # distillation from teacher.workdir with weight distill_alpha).
    sections: ClassVar[dict[str, dict[str, Any]]] = {"spvit": dict(
        pretrained_workdir="", lambda_=20.0, target_gflops=1.0, arch_lr=1e-3, architecture="", distill="none",
        distill_alpha=0.5)}
    field_ranges: ClassVar[dict[str, Range]] = {
        "spvit.lambda_": Range(0, meaning="the weight of SPViT's FLOPs loss"),
        "spvit.target_gflops": Range(0, low_open=True, meaning="SPViT's FLOPs target T in G MACs"),
        "spvit.arch_lr": Range(0, low_open=True, meaning="the gate logits' AdamW learning rate"),
        "spvit.distill_alpha": Range(0, 1, meaning="the weight of the teacher's hard labels in SPViT's "
                                                   "fine-tuning"),
    }
    path_fields: ClassVar[tuple[str, ...]] = ("spvit.pretrained_workdir", "spvit.architecture")
    may_change: ClassVar[tuple[str, ...]] = ("spvit.pretrained_workdir",)
    report: ClassVar[str] = "spvit"

    def dense_model(self, dtype: str = "") -> VisionTransformer:
        return dense_vit(self.config, self.num_classes, dtype)

    def check(self) -> None:
        super().check()
        self.dense_model()

    def initial_inputs(self) -> Any:
        """The dense run's parameters on the host (None without ``spvit.pretrained_workdir``)."""
        workdir = self.config.spvit.pretrained_workdir
        return read_pretrained_params(workdir) if workdir else None


class SPViTSearch(SPViTMethod):
    """SPViT's search of a DeiT supernet (see the module docstring)."""

    loss_terms = ("ce", "flops_loss", "gmacs", "total")

    # Checks (the spvit fields' ranges are SPViTMethod.field_ranges, which check_ranges applies) ------
    def check_inputs(self) -> None:
        """The pretrained run: there, finished, a DeiT of the same shapes (the head may differ)."""
        if self.config.spvit.pretrained_workdir:
            check_pretrained_run(self.config.spvit.pretrained_workdir, self.dense_model())

    # Models ---------------------------------------------------------------------------------------
    def student(self, dtype: str = "") -> SupernetViT:
        return supernet_of(self.dense_model(dtype))

    def apply_rngs(self, key: jax.Array) -> dict[str, jax.Array]:
        return {**super().apply_rngs(jax.random.fold_in(key, 1)), "gates": key}

    def prepare_params(self, params: Any, opt_state: Any, inputs: Any = None) -> Any:
        """The random init, with every weight the pretrained dense DeiT (``inputs``) has."""
        return params if inputs is None else merge_pretrained(params, inputs)[0]

    # Loss -----------------------------------------------------------------------------------------
    def macs(self, params: Any) -> jax.Array:
        """The supernet's MACs at the current gate logits (differentiable in them)."""
        m = self.student()
        msa, ffn = gate_logits(params, m.depth)
        channels = params["patch_embed"]["kernel"].shape[2]
        return vit_costs.supernet_macs(msa, ffn, m.image_size, m.patch_size, m.dim, m.num_heads,
                                       self.num_classes, channels)

    def loss(self, params, logits, features, labels, teacher_out):
        s = self.config.spvit
        ce = distill.cross_entropy(logits, labels)
        macs = self.macs(params)
        flops = vit_costs.flops_loss(macs, s.target_gflops, s.lambda_)
        total = ce + flops
        return total, dict(ce=ce, flops_loss=flops, gmacs=jax.lax.stop_gradient(macs) / 1e9, total=total)

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
                    arch_attention=[kind for kind, _ in arch], arch_ffn=[width for _, width in arch],
                    mlp_hidden=int(m.dim * m.mlp_ratio))

    def end_of_epoch(self, state: State, epoch: int, steps_per_epoch: int,
                     probe: Any = None) -> tuple[State, dict[str, Any]]:
        return state, self.architecture(state["params"])

    def summary_fields(self, state: State, student_costs: Mapping[str, Any], image_size: int,
                       channels: int) -> dict[str, Any]:
        s = self.config.spvit
        return dict(distill="ce", structure="spvit_supernet", per_layer_density={},
                    target_gflops=s.target_gflops, lambda_=s.lambda_,
                    pretrained_workdir=s.pretrained_workdir,
                    **self.architecture(state["params"], channels))

    def run_files(self, state: State) -> dict[str, Any]:
        """``architecture.json``: the found architecture (what the fine-tuning reads), with the search's
        target and lambda."""
        arch = compact_spvit.extract_architecture(jax.device_get(state["params"]))
        s = self.config.spvit
        arch["search"] = dict(target_gflops=s.target_gflops, lambda_=s.lambda_)
        return {compact_spvit.ARCHITECTURE: arch}


class SPViTFinetune(SparseLearning, TeacherRun, SPViTMethod):
    """SPViT's fine-tuning of a found architecture, optionally distilled and sparse (module docstring)."""

    @property
    def hard(self) -> bool:
        """DeiT's hard distillation from ``teacher.workdir`` (``spvit.distill="hard"``)."""
        return self.config.spvit.get("distill", "none") == "hard"

    def uses_teacher(self) -> bool:
        return self.hard

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return ("ce", "hard_kd", "total") if self.hard else ("ce", "total")

    # Checks ---------------------------------------------------------------------------------------
    def check(self) -> None:
        super().check()
        s = self.config.spvit
        if s.get("distill", "none") not in DISTILL_MODES:
            raise ConfigError(f"config.spvit.distill must be one of {DISTILL_MODES}, got {s.distill!r}")
        if not s.get("architecture", ""):
            read_found_architecture("")
        self.check_teacher()
        self.check_sparsity()

    @functools.cached_property
    def found(self) -> dict[str, Any]:
        """The found architecture (``spvit.architecture``), read on first use: the checks, the student,
        the initial parameters (traced) and the summary all use this one reading."""
        return read_found_architecture(self.config.spvit.architecture)

    def architecture(self) -> dict[str, Any]:
        return self.found

    def check_inputs(self) -> None:
        """The architecture (of this DeiT's shapes and classes), the pretrained run, the teacher run."""
        arch, dense = self.architecture(), self.dense_model()
        expected = dict(image_size=dense.image_size, patch_size=dense.patch_size, dim=dense.dim,
                        depth=dense.depth, num_heads=dense.num_heads,
                        mlp_hidden=int(dense.dim * dense.mlp_ratio), num_classes=self.num_classes)
        wrong = {k: arch[k] for k in expected if arch[k] != expected[k]}
        if wrong:
            raise ConfigError(f"the architecture at {self.config.spvit.architecture} has {wrong}, but "
                              f"config.model and the data give {({k: expected[k] for k in wrong})}: "
                              f"fine-tune with the model and data config the search ran with")
        if self.config.spvit.pretrained_workdir:
            check_pretrained_run(self.config.spvit.pretrained_workdir, dense)
        self.check_teacher_inputs()

    # Models ---------------------------------------------------------------------------------------
    def compact_vit(self, arch: dict[str, Any], dtype: str = "") -> nn.Module:
        """The found architecture ``arch`` in its fine-tuning (unfolded) form, at the DeiT's dtype."""
        return spvit_compact.CompactViT.from_architecture(
            arch, dtype=self.dense_model(dtype).dtype, folded=False,
            drop_path_rate=self.config.model.get("drop_path_rate", 0.0))

    def student(self, dtype: str = "") -> nn.Module:
        return self.compact_vit(self.architecture(), dtype)

    def run_model(self, workdir: str, dtype: str = "") -> nn.Module:
        """The architecture of the run's own ``architecture.json`` (the one it was fine-tuned with)."""
        path = os.path.join(workdir, compact_spvit.ARCHITECTURE)
        if not os.path.exists(path):
            raise RunDirError(f"{workdir} is an SPViT fine-tuning run without {compact_spvit.ARCHITECTURE}: "
                              f"run the fine-tuning again in it to finish it")
        return self.compact_vit(compact_spvit.load_architecture(path), dtype)

    def prepare_params(self, params: Any, opt_state: Any, inputs: Any = None) -> Any:
        """The found architecture's weights taken from the pretrained dense DeiT (``inputs``), under the
        initial masks when sparse (not rescaled: the weights are pretrained)."""
        if inputs is not None:
            variables, _ = compact_spvit.compact_from_dense(inputs, self.architecture(), {"params": params})
            params = variables["params"]
        return sparsity.apply_masks(params, sparsity.get_masks(opt_state)) if self.sparse else params

    # Loss and optimizer ---------------------------------------------------------------------------
    def loss(self, params, logits, features, labels, teacher_out):
        if not self.hard:
            ce = distill.cross_entropy(logits, labels)
            return ce, dict(ce=ce, total=ce)
        return distill.hard_distillation_loss(logits, teacher_out[0], labels,
                                              self.config.spvit.get("distill_alpha", 0.5))

    def inner_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        return adamw(self.config, steps_per_epoch)

    # Summary --------------------------------------------------------------------------------------
    def summary_fields(self, state: State, student_costs: Mapping[str, Any], image_size: int,
                       channels: int) -> dict[str, Any]:
        arch, dense = self.architecture(), self.dense_model()
        blocks, shapes = spvit_compact.arch_blocks(arch), spvit_compact.arch_cost_kwargs(arch)
        dense_macs, dense_params = dense_macs_params(dense, channels)
        pretrained = self.config.spvit.pretrained_workdir
        search = arch.get("search", {})
        fields = dict(
            distill=self.config.spvit.get("distill", "none"), **self.sparsity_fields(state),
            arch_attention=[kind for kind, _ in blocks], arch_ffn=[width for _, width in blocks],
            mlp_hidden=arch["mlp_hidden"], arch_gmacs=vit_costs.vit_arch_macs(blocks, **shapes) / 1e9,
            dense_gmacs=dense_macs / 1e9, arch_params=count_params(state["params"]),
            arch_params_folded=vit_costs.vit_arch_params(blocks, **shapes, convention="folded"),
            dense_params=dense_params, pretrained_workdir=pretrained,
            dense_test_accuracy=(run_dir.read_summary(pretrained) or {}).get("test_accuracy") if pretrained
            else None,
            target_gflops=search.get("target_gflops"), lambda_=search.get("lambda_"))
        if self.uses_teacher():
            fields["teacher_test_accuracy"] = self.teacher_summary().get("test_accuracy")
        return fields

    def run_files(self, state: State) -> dict[str, Any]:
        """``architecture.json``: the run's own copy (what :meth:`run_model` rebuilds)."""
        return {compact_spvit.ARCHITECTURE: self.architecture()}
