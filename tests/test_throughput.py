import jax

from medseg_jax.tools import throughput


def test_throughput_reports_every_figure(make_tiny_config, tmp_path, capsys):
    config = make_tiny_config(**{"train.log_every_steps": 2})
    out = throughput.run(config, str(tmp_path), steps=2, warmup=1)
    train, infer = out["rows"]
    for row in (train, infer):
        assert row["compile_s"] > 0 and row["step_ms"] > 0
        assert row["images_per_s"] == row["images_per_s_per_device"] * jax.device_count()
        assert row["gflop_per_step"] > 0 and row["tflop_per_s"] > 0
        assert row["compiled_mib"] > 0
        assert row["mfu"] is None  # no known peak for a CPU
    assert train["gflop_per_step"] > 2 * infer["gflop_per_step"]  # batch 8 both: fwd+bwd
    assert out["data_ms"] > 0 and out["loop_ms"] > 0 and 0 <= out["wait_share"] < 1
    printed = capsys.readouterr().out
    assert "| train step |" in printed and "full loop" in printed


def test_peak_flops_by_device_kind_and_dtype():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12
    assert throughput.peak_flops("TPU v4", "float32") == 275e12
    assert throughput.peak_flops("cpu", "float32") is None


def test_peak_flops_matches_whole_device_names():
    assert throughput.peak_flops("NVIDIA L4", "bfloat16") == 121e12
    assert throughput.peak_flops("NVIDIA L40S", "bfloat16") is None  # not an L4
    assert throughput.peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12
    assert throughput.peak_flops("NVIDIA A10G", "bfloat16") is None  # not an A10
    assert throughput.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert throughput.peak_flops("TPU v5p", "bfloat16") == 459e12
    assert throughput.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert throughput.peak_flops("cpu", "float32") is None


def test_the_tool_sets_the_configs_xla_cpu_flags_as_training_does(tmp_path):
    """`train.xla_cpu_ynn=False` (the recipe configs) changes the CPU step's speed: the tool
    must time what training runs, so it sets the flag before the backend starts too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tiny = ["--config.data.synthetic_cases=3", "--config.data.synthetic_size=16",
            "--config.data.synthetic_depth=4", "--config.data.image_size=(16,16)",
            "--config.model.base_features=4", "--config.model.depth=3",
            "--config.train.batch_size=4", "--config.eval.batch_size=4",
            f"--config.train.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-m", "medseg_jax.tools.throughput", "--config=configs/unet.py",
         *tiny, "--config.train.xla_cpu_ynn=False", "--parts=train", "--steps=1",
         "--warmup=0", f"--workdir={tmp_path}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from medseg_jax import sharding

    if sharding.cpu_flag_measured():
        assert ("XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE "
                "(train.xla_cpu_ynn=False)") in out.stdout
    else:  # a jaxlib the flag was not measured with is not given it, and says so
        assert "XLA_FLAGS=" not in out.stdout and "so it is not set" in out.stderr
