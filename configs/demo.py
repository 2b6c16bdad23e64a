"""The demo: the whole paper in miniature on the embedded digits data, in 4 to 7 minutes on 2 CPU cores.

Three phases run in order in subfolders of the workdir, 30 epochs each at the digits' own 8x8
(``alite_jax.config.digits_demo``): a ResNet-50 teacher (width 0.25), a dense SA-ResNet26 baseline
(CE only) and the sparse-distilled SA-ResNet26 (KD+AT, irregular, d = 0.1). The student's report
compares all three. ``benchmarks/ablation.py`` runs the same student under every loss and pruning
setting, over seeds.
"""

import ml_collections

from alite_jax.config import apply_switch, base_config, digits_demo, teacher_config


def get_config(arg=None):
    """``demo.py:smoke``: every phase shrunk to 2 epochs on 512 training digits, a quick check."""
    teacher = digits_demo(teacher_config("digits"))
    # A 50-layer net 0.25 wide learns these few steps better at a lower rate.
    teacher.optimizer.lr = 0.02
    baseline = digits_demo(base_config())
    baseline.mode = "baseline"
    student = digits_demo(base_config())
    student.teacher.workdir = "teacher"       # relative paths are inside the demo's workdir
    student.baseline_workdir = "baseline"
    teacher, baseline, student = (apply_switch(phase, arg) for phase in (teacher, baseline, student))
    c = ml_collections.ConfigDict()
    c.phases = ml_collections.ConfigDict(dict(teacher=teacher, baseline=baseline, student=student))
    c.phase_order = ("teacher", "baseline", "student")
    return c
