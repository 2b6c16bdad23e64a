"""AttentionLite's sparse learning as the mixin of the methods that prune with it (Algorithm 1): the
optimizer wrapped in :func:`alite_jax.sparsity.sparse_learning` at ``sparsity.density < 1``, a
prune/regrow round after every epoch's evaluation but the last's, and the masks.

See :mod:`alite_jax.sparsity` for the rule and docs/sparse_learning.md for its sources.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import ml_collections
import optax

from alite_jax import sparsity
from alite_jax.config import Range
from alite_jax.methods.base import State
from alite_jax.methods.optim import optimizer_from_config

# sparsity: the options of alite_jax.sparsity.sparse_learning and of the rounds (docs/sparse_learning.md).
# round_every: 0 runs a round after each epoch's evaluation (Algorithm 1); N > 0 runs them inside the
# optimizer's update every N steps, whatever the epoch's length, with the same schedule over the run's steps.
# revive_dormant: after each per-epoch round, weights regrown into a channel that is constant over a
# training batch start at their layer's scale (alite_jax.sparsity.revive_dormant), not at zero.
SECTION = dict(density=0.1, structure="irregular", distribution="uniform", prune_rate=0.5, schedule="linear",
               full_rate_steps=20, redistribution="momentum", min_layer_fraction=0.25,
               reset_regrown_momentum=True, keep_channels=True, fan_in_init=True, round_every=0,
               revive_dormant=True)
REVIVE_STREAM = 0x5EED  # folded into the seed and the epoch for revive_dormant's draw
Probe = Callable[[dict[str, Any]], Any]  # state -> each kernel's output-channel variance (train.py's)
_revive = jax.jit(sparsity.revive_dormant)
RANGES = {
    "sparsity.density": Range(0, 1, low_open=True, meaning="the fraction of prunable weights kept"),
    "sparsity.prune_rate": Range(0, 1, meaning="the first round's prune rate p0"),
    "sparsity.full_rate_steps": Range(0, integer=True,
                                      meaning="steps an epoch needs to prune at the full rate; 0: off"),
    "sparsity.min_layer_fraction": Range(0, 1, meaning="the floor of each layer's share of its initial "
                                                       "weights"),
    "sparsity.round_every": Range(0, integer=True, meaning="steps between in-update rounds; 0: a round after "
                                                           "each epoch"),
}


def sparse_optimizer(config: ml_collections.ConfigDict, inner: optax.GradientTransformation,
                     steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """``inner`` wrapped in :func:`alite_jax.sparsity.sparse_learning` with the config's sparsity; with
    ``sparsity.round_every`` its rounds run inside the update, on Algorithm 1's schedule over the run's
    ``num_epochs * steps_per_epoch`` steps (:func:`alite_jax.sparsity.round_prune_rate`)."""
    s = config.sparsity
    rounds = {}
    if s.get("round_every", 0):
        rounds = dict(round_every=s.round_every, prune_rate=sparsity.round_prune_rate(
            s.prune_rate, config.num_epochs * steps_per_epoch, s.round_every, s.schedule,
            full_rate_steps=s.full_rate_steps))
    return sparsity.sparse_learning(
        inner, density=s.density, structure=s.structure, distribution=s.distribution, seed=config.seed,
        redistribution=s.redistribution, min_layer_fraction=s.min_layer_fraction,
        reset_regrown_momentum=s.reset_regrown_momentum, keep_channels=s.get("keep_channels", True),
        **rounds)


def sparse_round(config: ml_collections.ConfigDict, state: State, epoch: int, steps_per_epoch: int,
                 probe: Probe | None = None) -> tuple[State, dict[str, Any]]:
    """Algorithm 1's end of epoch: a prune/regrow round after every epoch but the last (after its
    evaluation: the model that epoch trained is the one evaluated), unless the rounds run inside the
    update (``sparsity.round_every``), and the densities for the metrics.

    With ``sparsity.revive_dormant`` and a ``probe`` (the trainer's: the output channels' variance
    over a training batch under a state's weights), the weights the round regrew into dormant channels
    are drawn at their layer's scale (:func:`alite_jax.sparsity.revive_dormant`); the row's ``revived``
    counts them."""
    row = {}
    s, num_epochs = config.sparsity, config.num_epochs
    if epoch < num_epochs - 1 and not s.get("round_every", 0):
        rate = sparsity.prune_rate_schedule(s.prune_rate, num_epochs, s.schedule,
                                            steps_per_epoch=steps_per_epoch,
                                            full_rate_steps=s.full_rate_steps)(epoch)
        before = sparsity.get_masks(state["opt_state"])
        params, opt_state = sparsity.prune_and_regrow(state["params"], state["opt_state"], rate)
        state = dict(state, params=params, opt_state=opt_state)
        row["prune_rate"] = rate
        if s.get("revive_dormant", True) and probe is not None:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), epoch), REVIVE_STREAM)
            params, revived = _revive(params, before, sparsity.get_masks(opt_state), probe(state), key)
            state = dict(state, params=params)
            row["revived"] = int(sum(jax.device_get(list(revived.values()))))
    masks = sparsity.get_masks(state["opt_state"])
    row.update(density=sparsity.global_density(masks), per_layer_density=sparsity.layer_densities(masks))
    return state, row


class SparseLearning:
    """The ``sparsity`` config section and what a method does with it (mixed in before
    :class:`~alite_jax.methods.base.Method`): its optimizer (:meth:`inner_optimizer`) wrapped in
    :func:`sparse_optimizer`, the round after each epoch (:func:`sparse_round`), the masks, and the
    initial weights under the initial masks."""

    config: ml_collections.ConfigDict
    sections: ClassVar[dict[str, dict[str, Any]]] = {"sparsity": SECTION}
    field_ranges: ClassVar[dict[str, Range]] = RANGES

    @property
    def sparse(self) -> bool:
        """Whether the run prunes: ``sparsity.density < 1`` (1.0 trains the method dense)."""
        return self.config.sparsity.density < 1.0

    def check_sparsity(self) -> None:
        """Raises :class:`alite_jax.errors.ConfigError` for sparsity options that cannot run (the
        optimizer's wrapper and the prune-rate schedule check them)."""
        s = self.config.sparsity
        if self.sparse:
            sparse_optimizer(self.config, optax.sgd(0.1, momentum=0.9))
        sparsity.prune_rate_schedule(s.prune_rate, self.config.num_epochs, s.schedule, steps_per_epoch=1,
                                     full_rate_steps=s.full_rate_steps)

    def inner_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """The optimizer the sparse wrapper wraps (it must keep a momentum / first moment)."""
        return optimizer_from_config(self.config, steps_per_epoch)

    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        inner = self.inner_optimizer(steps_per_epoch)
        return sparse_optimizer(self.config, inner, steps_per_epoch) if self.sparse else inner

    def masked_params(self, params: Any, opt_state: Any) -> Any:
        """The initial weights under the initial masks: with ``sparsity.fan_in_init`` each output channel
        rescaled to its active fan-in (:func:`alite_jax.sparsity.scale_to_fan_in`); dense: unchanged."""
        if not self.sparse:
            return params
        masks = sparsity.get_masks(opt_state)
        if self.config.sparsity.get("fan_in_init", True):
            return sparsity.scale_to_fan_in(params, masks)
        return sparsity.apply_masks(params, masks)

    def end_of_epoch(self, state: State, epoch: int, steps_per_epoch: int,
                     probe: Probe | None = None) -> tuple[State, dict[str, Any]]:
        """A prune/regrow round (:func:`sparse_round`) when sparse."""
        if not self.sparse:
            return state, {}
        return sparse_round(self.config, state, epoch, steps_per_epoch, probe)

    def masks(self, state: State) -> Any | None:
        return sparsity.get_masks(state["opt_state"]) if self.sparse else None

    def sparsity_fields(self, state: State) -> dict[str, Any]:
        """The summary's structure and per-layer densities."""
        masks = self.masks(state)
        return dict(structure=self.config.sparsity.structure if self.sparse else "dense",
                    per_layer_density=sparsity.layer_densities(masks) if masks is not None else {})
