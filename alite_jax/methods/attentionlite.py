"""AttentionLite's sparse distillation (Kundu & Sundaresan, Algorithm 1) as a :class:`Method`.

The student learns from a finished teacher run (``config.teacher.workdir``,
:class:`~alite_jax.methods.teacher.TeacherRun`) with the loss of eq. 2 (``config.distill.loss``: "kd" or
"kd+at"; "ce" trains the student alone) while sparse learning
(:class:`~alite_jax.methods.sparse.SparseLearning`) prunes it to ``config.sparsity.density`` (1.0: dense
distillation), with prune/regrow after every epoch but the last.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from alite_jax import costs, distill
from alite_jax.config import Range
from alite_jax.errors import ConfigError
from alite_jax.methods.base import Method, State
from alite_jax.methods.sparse import SparseLearning
from alite_jax.methods.teacher import TeacherRun


class AttentionLite(SparseLearning, TeacherRun, Method):
    """Distillation from a CNN teacher (CE + KD + attention transfer) with sparse learning."""

    # distill: eq. 2's terms and weights (alite_jax.distill; docs/losses.md says where each comes from).
    sections: ClassVar[dict[str, dict[str, Any]]] = {
        "distill": dict(loss="kd+at", alpha=0.1, beta=1000.0, temperature=4.0)}
    field_ranges: ClassVar[dict[str, Range]] = {
        "distill.alpha": Range(0, 1, meaning="the weight of cross-entropy against the teacher's KL term"),
        "distill.beta": Range(0, meaning="the weight of attention transfer"),
        "distill.temperature": Range(0, low_open=True, meaning="the softmax temperature rho"),
    }

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return distill.loss_terms(self.config.distill.loss)

    def uses_teacher(self) -> bool:
        """A distillation with a teacher term; ``distill.loss="ce"`` trains the (sparse) student alone."""
        return self.config.distill.loss != "ce"

    def check(self) -> None:
        super().check()
        config = self.config
        if config.distill.loss not in distill.MODES:
            raise ConfigError(f"config.distill.loss must be one of {distill.MODES} ('ce': sparse training "
                              f"without a teacher), got {config.distill.loss!r}")
        self.check_teacher()
        self.check_sparsity()

    def check_inputs(self) -> None:
        """The teacher run: there, finished, and trained on this data at this image size."""
        self.check_teacher_inputs()

    def loss(self, params, logits, features, labels, teacher_out):
        t_logits, t_features = teacher_out if teacher_out is not None else (None, None)
        d = self.config.distill
        return distill.distillation_loss(logits, t_logits, labels, features, t_features, mode=d.loss,
                                         alpha=d.alpha, beta=d.beta, temperature=d.temperature)

    def prepare_params(self, params: Any, opt_state: Any, inputs: Any = None) -> Any:
        """The student's random initial weights under the initial masks
        (:meth:`~alite_jax.methods.sparse.SparseLearning.masked_params`)."""
        return self.masked_params(params, opt_state)

    def summary_fields(self, state: State, student_costs: Mapping[str, Any], image_size: int,
                       channels: int) -> dict[str, Any]:
        fields = dict(distill=self.config.distill.loss, **self.sparsity_fields(state))
        teacher = self.teacher_model()
        if teacher is not None:
            teacher_costs = costs.count_costs(teacher, image_size, channels)
            fields.update(costs.reductions(student_costs, teacher_costs),
                          teacher_params=teacher_costs["params"], teacher_flops=teacher_costs["flops"],
                          teacher_test_accuracy=self.teacher_summary().get("test_accuracy"))
        return fields
