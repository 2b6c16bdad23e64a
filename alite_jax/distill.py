"""The distillation loss of AttentionLite (paper eq. 2), in one module.

docs/losses.md gives each convention below with its public source and the test that pins it.

Eq. 2 trains the student on three terms::

    L = alpha * CE(z_S, y) + (1 - alpha) * rho^2 * KL(softmax(z_T / rho) || softmax(z_S / rho))
        + (beta / 2) * sum_j AT_j(Q_S^j, Q_T^j)

* CE: cross entropy with the labels, mean over the batch.
* KD (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"): the KL divergence
  of the temperature-softened teacher distribution from the student's, summed over classes, averaged
  over the batch and multiplied by T**2 so that its gradients keep their scale as T changes. This is
  exactly ``DistillKL`` of the reference code of Tian, Krishnan & Isola 2020 ("Contrastive
  Representation Distillation", CRD), which the paper follows: ``F.kl_div(log_softmax(s/T),
  softmax(t/T), reduction='sum') * T**2 / B``; T = 4 by default, as there.
* AT (Zagoruyko & Komodakis 2017, "Paying more attention to attention"): each feature map f (B, H, W, C)
  becomes a spatial attention map, the channel mean of |f|**p flattened over H*W and L2-normalised; a
  pair's loss is the mean over batch and positions of the squared difference of the student's and the
  teacher's maps (the mean-squared form of their reference code and of CRD's ``Attention``), summed
  over the pairs (the four stage outputs). Eq. 2 writes beta/2 in front of that sum (and each pair's
  term as a plain norm of the difference of the normalised maps); this module keeps eq. 2's beta/2 with
  the reference codes' mean-squared form, the form with which the paper's beta = 1000 gives the term a
  sensible weight. Both reference codes (AT's and CRD's) multiply the sum by beta without the /2, so
  their setting corresponds to ``beta=2000`` here (docs/losses.md).
* Hard distillation (Touvron et al. 2021, "Training data-efficient image transformers", DeiT's
  ``DistillationLoss`` with ``distillation_type="hard"`` in facebookresearch/deit ``losses.py``), used by
  SPViT's fine-tuning (ziplab/SPViT ``SPViT_DeiT/losses.py``) without a distillation token: the class
  head is trained on (1 - alpha) * CE(z_S, y) + alpha * CE(z_S, argmax z_T), alpha = 0.5
  (:func:`hard_distillation_loss`).
* When a pair's spatial sizes differ, the larger feature map is average-pooled down to the smaller
  size before taking maps (CRD: ``F.adaptive_avg_pool2d``); only integer ratios are supported, where
  that adaptive pooling is plain block-mean pooling. Student and teacher may differ in channels, since
  the maps average over channels.

Choices: every loss is computed in float32 whatever the input dtype (bfloat16 logits and features
work); the teacher side always goes through ``jax.lax.stop_gradient``, so gradients reach only the
student; the L2 normalisation divides by ``max(||x||_2, 1e-12)`` like ``torch.nn.functional.normalize``,
written so that an all-zero map has a zero (not NaN) gradient. Everything works eagerly and under
``jax.jit`` (``mode`` must then be static, e.g. bound with ``functools.partial``).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

MODES = ("ce", "kd", "kd+at")

_NORM_EPS = 1e-12


def _check_logits(logits: jax.Array) -> None:
    chex.assert_rank(logits, 2)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of -log softmax(logits)[label]; logits (B, K), float32 result.

    ``labels`` are class indices (B,) or target distributions (B, K) (Mixup/CutMix and label
    smoothing, :mod:`alite_jax.data.mixup`): then the loss is -sum_k targets_k log softmax(logits)_k.
    """
    _check_logits(logits)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if labels.ndim == 2:
        chex.assert_equal_shape([labels, logits])
        loss = -jnp.mean(jnp.sum(labels.astype(jnp.float32) * log_probs, axis=-1))
        chex.assert_shape(loss, ())
        return loss
    chex.assert_shape(labels, (logits.shape[0],))
    chex.assert_type(labels, int)
    picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    loss = -jnp.mean(picked)
    chex.assert_shape(loss, ())
    return loss


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0) -> jax.Array:
    """Hinton's KD: T**2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch.

    Same as CRD's ``DistillKL`` (docs/losses.md). The teacher logits are stop-gradient'ed: only the
    student learns.
    """
    _check_logits(student_logits)
    chex.assert_equal_shape([student_logits, teacher_logits])
    s = student_logits.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
    # p_t * (log p_t - log p_s) with log p_t from log_softmax: finite even where p_t underflows to 0.
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    loss = jnp.mean(kl) * temperature**2
    chex.assert_shape(loss, ())
    return loss


def attention_map(features: jax.Array, p: float = 2.0) -> jax.Array:
    """Zagoruyko's spatial attention map: (B, H, W, C) -> (B, H*W), channel mean of |f|**p, L2-normalised.

    Normalised as ``x / max(||x||_2, 1e-12)`` (torch ``F.normalize``), in float32; docs/losses.md.
    """
    chex.assert_rank(features, 4)
    b, h, w, _ = features.shape
    f = features.astype(jnp.float32)
    x = jnp.mean(jnp.abs(f) ** p, axis=-1).reshape(b, h * w)
    # sqrt(max(sum x^2, eps^2)) == max(||x||, eps), but its gradient at x = 0 is 0 instead of NaN.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS**2))
    out = x / norm
    chex.assert_shape(out, (b, h * w))
    return out


def _pool_to(features: jax.Array, h: int, w: int) -> jax.Array:
    """Block-mean pool (B, H, W, C) down to (B, h, w, C); H, W must be multiples of h, w."""
    b, big_h, big_w, c = features.shape
    rh, rw = big_h // h, big_w // w
    return features.reshape(b, h, rh, w, rw, c).mean(axis=(2, 4))


def _match_sizes(student: jax.Array, teacher: jax.Array, index: int) -> tuple[jax.Array, jax.Array]:
    """Average-pool the spatially larger of a pair down to the smaller size (CRD's adaptive pooling)."""
    (sh, sw), (th, tw) = student.shape[1:3], teacher.shape[1:3]
    if (sh, sw) == (th, tw):
        return student, teacher
    problem = (f"attention transfer pair {index}: cannot pool student features {tuple(student.shape)} and "
               f"teacher features {tuple(teacher.shape)} to a common spatial size: ")
    if sh >= th and sw >= tw:
        big, small = (sh, sw), (th, tw)
    elif sh <= th and sw <= tw:
        big, small = (th, tw), (sh, sw)
    else:
        raise ValueError(problem + "neither map is at least as large as the other in both height and width")
    if big[0] % small[0] or big[1] % small[1]:
        raise ValueError(problem + f"the larger size {big} is not an integer multiple of the smaller {small}")
    if big == (sh, sw):
        return _pool_to(student, th, tw), teacher
    return student, _pool_to(teacher, sh, sw)


def attention_transfer_loss(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array],
                            p: float = 2.0) -> jax.Array:
    """AT: sum over pairs of the mean (over batch and positions) of (map_S - map_T)**2; float32.

    The larger map of a pair is average-pooled to the smaller size first (integer ratios only);
    channels may differ. Teacher features are stop-gradient'ed.
    """
    student_features, teacher_features = list(student_features), list(teacher_features)
    if len(student_features) != len(teacher_features):
        raise ValueError(f"attention transfer needs one teacher feature map per student feature map; got "
                         f"{len(student_features)} student and {len(teacher_features)} teacher maps")
    total = jnp.zeros((), jnp.float32)
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        chex.assert_rank([fs, ft], 4)
        chex.assert_equal_shape_prefix([fs, ft], 1)  # same batch
        fs = fs.astype(jnp.float32)
        ft = jax.lax.stop_gradient(ft.astype(jnp.float32))
        fs, ft = _match_sizes(fs, ft, i)
        diff = attention_map(fs, p) - attention_map(ft, p)
        total = total + jnp.mean(diff * diff)
    chex.assert_shape(total, ())
    return total


def loss_terms(mode: str) -> tuple[str, ...]:
    """The names of the terms :func:`distillation_loss` returns for ``mode`` (what a trainer logs)."""
    if mode not in MODES:
        raise ValueError(f"unknown distillation mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
    return {"ce": ("ce",), "kd": ("ce", "kd"), "kd+at": ("ce", "kd", "at")}[mode] + ("total",)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array | None, labels: jax.Array,
                      student_features: Sequence[jax.Array] | None,
                      teacher_features: Sequence[jax.Array] | None, *,
                      mode: str = "kd+at", alpha: float = 0.1, beta: float = 1000.0,
                      temperature: float = 4.0, p: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 2: the training loss and its terms, as ``(total, {"ce", "kd", "at", "total"})``.

    * ``"ce"``:    CE (teacher ignored; for training the teacher and the dense baseline);
    * ``"kd"``:    alpha * CE + (1 - alpha) * KD;
    * ``"kd+at"``: alpha * CE + (1 - alpha) * KD + (beta / 2) * AT.

    The beta/2 is eq. 2's; the AT and CRD reference codes multiply the same mean-squared sum by beta
    without the /2, i.e. ``beta=2000`` here (docs/losses.md).
    The dict holds only the terms of the mode, all float32 scalars. Inputs not used by the mode
    (teacher logits for "ce", features for "ce" and "kd") may be None.
    """
    names = loss_terms(mode)
    ce = cross_entropy(student_logits, labels)
    terms = {"ce": ce}
    if mode == "ce":
        total = ce
    else:
        if teacher_logits is None:
            raise ValueError(f"mode {mode!r} needs teacher_logits")
        kd = kd_loss(student_logits, teacher_logits, temperature)
        terms["kd"] = kd
        total = alpha * ce + (1.0 - alpha) * kd
        if mode == "kd+at":
            if student_features is None or teacher_features is None:
                raise ValueError("mode 'kd+at' needs student_features and teacher_features")
            student_features, teacher_features = list(student_features), list(teacher_features)
            chex.assert_equal_shape_prefix([student_logits, *student_features, *teacher_features], 1)
            at = attention_transfer_loss(student_features, teacher_features, p)
            terms["at"] = at
            total = total + (beta / 2.0) * at
    total = jnp.asarray(total, jnp.float32)
    terms["total"] = total
    assert tuple(terms) == names, (tuple(terms), names)
    chex.assert_shape(list(terms.values()), ())
    chex.assert_type(list(terms.values()), jnp.float32)
    return total, terms


def hard_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                           alpha: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DeiT's hard distillation on the class head: ``(1 - alpha) * CE(z_S, labels) + alpha *
    CE(z_S, argmax z_T)``, as ``(total, {"ce", "hard_kd", "total"})``.

    ``labels`` are class indices or target distributions (Mixup/CutMix, label smoothing: the base term
    takes them as they are, as DeiT's ``base_criterion`` does); the teacher's label is its argmax, a hard
    label without smoothing (DeiT: ``F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))``). No
    gradient reaches the teacher.
    """
    _check_logits(student_logits)
    chex.assert_equal_shape([student_logits, teacher_logits])
    teacher_labels = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
    ce = cross_entropy(student_logits, labels)
    hard = cross_entropy(student_logits, teacher_labels)
    total = jnp.asarray((1.0 - alpha) * ce + alpha * hard, jnp.float32)
    return total, {"ce": ce, "hard_kd": hard, "total": total}
