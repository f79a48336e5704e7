"""The full benchmark: U-Net, FCN and Attention U-Net with the study's protocol.

python -m medseg_jax.main --config=configs/benchmark.py --workdir=runs/bench

Every field of configs/default.py applies to all architectures (data, training,
augmentation, evaluation); the ``benchmark`` section says what to compare.
"""

import ml_collections

from medseg_jax.config import default_config


def get_config():
    config = default_config()
    config.benchmark = b = ml_collections.ConfigDict()
    # Architectures, comma-separated: unet, fcn, attention_unet; "_3d" for the 3D variant
    # (e.g. "unet,unet_3d"; 3D runs skip 2D data sets such as the synthetic ultrasound).
    b.models = "unet,fcn,attention_unet"
    b.image_size_3d = (64, 64, 24)  # patch size of the 3D variants
    b.batch_size_3d = 2
    # Transfer learning: an earlier benchmark workdir; each architecture is fine-tuned
    # from its counterpart there (and, with compare_scratch, also trained from scratch).
    b.init_from = ""
    b.compare_scratch = True
    b.freeze_encoder_epochs = 0
    # Hyperparameter search (the study's): every combination is trained and scored on the
    # validation split; the best by validation Dice is evaluated once on the test split.
    b.sweep = s = ml_collections.ConfigDict()
    s.enabled = False
    s.learning_rates = "1e-3,3e-4"
    s.batch_sizes = "16"
    s.num_epochs = "30"
    s.patience = "8"
    return config
