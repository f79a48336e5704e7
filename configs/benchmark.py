"""The full benchmark: U-Net, FCN and Attention U-Net with the study's protocol.

python -m medseg_jax.main --config=configs/benchmark.py --workdir=runs/bench

Every field of configs/default.py applies to all architectures (data, training,
augmentation, evaluation); the ``benchmark`` section says what to compare (its fields:
medseg_jax/config.py, study_section). On real MRI, CT and ultrasound in one command:
--config.benchmark.datasets=hippocampus:../shared/data/Task04_Hippocampus,\
hc18:../shared/data/HC18,openkbp:../shared/data/OpenKBP
"""

from medseg_jax.config import default_config, study_section


def get_config():
    config = default_config()
    config.benchmark = study_section()
    return config
