"""The three architectures compared with nnU-Net's recipe instead of the study's protocol.

python -m medseg_jax.main --config=configs/benchmark_recipe.py --workdir=runs/bench_recipe \
    --config.data.root=/tmp/HC18_decathlon

Every architecture gets the same plan, deep supervision (FCN: its score maps; Attention
U-Net: its decoder), schedule, augmentation and oversampling (medseg_jax/config.py
`recipe`); only model.name differs between the runs.
"""

from medseg_jax.config import default_config, recipe, study_section


def get_config():
    config = default_config()
    config.benchmark = study_section()
    recipe(config)
    config.train.num_epochs = 20  # of 250 steps
    # Adam 3e-3, chosen on validation Dice over the data sets and architectures measured
    # (docs/results/study_real.md): 1e-3 left U-Net / Attention U-Net at 0 on OpenKBP.
    config.train.learning_rate = 3e-3
    config.benchmark.image_size_3d = ()  # 3D entries: patch and batch from the plan too
    config.benchmark.batch_size_3d = 0
    # With --config.benchmark.sweep.enabled=True: only the learning rate is searched; the
    # plan's batch, the budget's (or num_epochs') epochs and no early stopping stay.
    config.benchmark.sweep.learning_rates = "1e-3,3e-3"
    config.benchmark.sweep.batch_sizes = ""
    config.benchmark.sweep.num_epochs = ""
    config.benchmark.sweep.patience = ""
    return config
