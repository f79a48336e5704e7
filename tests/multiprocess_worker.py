"""One process of tests/test_sharding.py's multi-process run (not a test module).

  python tests/multiprocess_worker.py WORKDIR OUT.npz NUM_PROCESSES PROCESS_ID PORT

Trains the tiny config of tests/conftest.py through ``train.train`` (the data already
prepared in WORKDIR by the test) and saves this process's final parameters to OUT.npz.
The caller sets JAX_PLATFORMS=cpu and the fake device count.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def main(workdir: str, out: str, num_processes: int, process_id: int, port: int) -> None:
    import jax
    import numpy as np

    from medseg_jax import sharding, train

    if num_processes > 1:
        assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    from conftest import tiny_config

    config = tiny_config(**{"train.batch_size": 8, "train.num_epochs": 1,
                            "train.steps_per_epoch": 3})
    _, state = train.train(config, workdir, return_state=True)
    leaves = jax.tree_util.tree_leaves_with_path((state.params, state.batch_stats))
    local = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
             for path, leaf in leaves}
    local["__devices__"] = np.array([jax.device_count(), jax.local_device_count(),
                                     jax.process_count(), int(state.step)])
    np.savez(out, **local)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
