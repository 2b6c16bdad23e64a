"""The demo: the whole paper in miniature on the embedded digits data, in a few minutes on 2 CPU cores.

Three phases run in order in subfolders of the workdir: a ResNet-50 teacher (width 0.25), a dense
SA-ResNet26 baseline (CE only) and the sparse-distilled SA-ResNet26 (KD+AT, irregular, d = 0.1),
all at the digits' own 8x8. The student's report compares all three.
"""

import ml_collections

from alite_jax.config import base_config


def _common(c):
    c.num_epochs = 8
    c.data.dataset = "digits"
    c.data.image_size = 8
    c.data.batch_size = c.data.eval_batch_size = 64
    c.optimizer.decay_epochs = (4, 6)
    c.log_every_steps = 22
    c.model.width = 0.25
    c.optimizer.lr = 0.05  # lr 0.1 diverges for these narrow nets on so few steps
    return c


def get_config(arg=None):
    del arg
    teacher = _common(base_config())
    teacher.mode = "teacher"
    teacher.model = ml_collections.ConfigDict(dict(name="resnet50", width=0.25, dtype="float32"))
    # A 50-layer net 0.25 wide learns these few steps better at a lower rate, for longer.
    teacher.optimizer.lr = 0.02
    teacher.num_epochs = 12
    teacher.optimizer.decay_epochs = (6, 9)
    baseline = _common(base_config())
    baseline.mode = "baseline"
    student = _common(base_config())
    student.teacher.workdir = "teacher"       # relative paths are inside the demo's workdir
    student.baseline_workdir = "baseline"
    c = ml_collections.ConfigDict()
    c.phases = ml_collections.ConfigDict(dict(teacher=teacher, baseline=baseline, student=student))
    c.phase_order = ("teacher", "baseline", "student")
    return c
