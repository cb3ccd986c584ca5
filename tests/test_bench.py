"""mipnerf360.bench: the throughput command runs real training steps of any config and
prints one line."""

import os
import re

import numpy as np
import pytest
import torch

from mipnerf360 import bench, cli, configs, sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_scene_rays_look_at_the_origin():
    cfg = configs.get_config("360")
    scene = bench.synthetic_scene(cfg, width=16, height=12, n=4)
    assert scene.images.shape == (4, 12, 16, 3) and scene.near == 0.2 and scene.far == 1e6
    batch = sampling.RaySampler(scene, 64, "cpu").sample(1)
    o, d = batch["origins"], batch["viewdirs"]
    torch.testing.assert_close(o.norm(dim=-1), torch.ones(64))  # the ring has radius 1
    # every ray passes close to the origin: distance of the origin from the ray < 0.5
    closest = o - (o * d).sum(-1, keepdim=True) * d
    assert float(closest.norm(dim=-1).max()) < 0.5
    assert float((o * d).sum(-1).max()) < 0  # and looks towards it


def test_run_bench_trains_the_model():
    """The timed steps are real training steps: the loss goes down on a fixed image."""
    cfg = bench.build_config("tiny", overrides=["train.lr_delay_steps=0"], batch_size=32)
    r0 = bench.run_bench(cfg, steps=1, warmup=0)
    r = bench.run_bench(cfg, steps=30, warmup=0)
    assert r["finite"] and r["loss"] < 0.9 * r0["loss"], (r0["loss"], r["loss"])
    assert r["rays_per_s"] == pytest.approx(32 / r["sec_per_step"])
    assert r["params"] == 47_517 and r["compile"] is False and r["precision"] == "fp32"
    assert r["peak_memory_mb"] > 10


def test_config_overrides_and_precision_reach_the_step():
    cfg = bench.build_config(
        "tiny", overrides=["model.nerf_mlp.net_width=8"], batch_size=8, precision="bf16"
    )
    r = bench.run_bench(cfg, steps=1, warmup=0)
    assert r["precision"] == "bf16" and r["params"] < 47_517


def test_flops_per_ray_counts_the_mlp_matmuls():
    cfg = bench.build_config("tiny", batch_size=8)
    r = bench.run_bench(cfg, steps=1, warmup=0, flops=True)
    m = cfg.model
    # forward: 2 * (weights) per sample per layer; backward: about twice that again
    prop = sum(w.numel() for w in _mlp(cfg).prop_mlp.parameters() if w.ndim == 2)
    nerf = sum(w.numel() for w in _mlp(cfg).nerf_mlp.parameters() if w.ndim == 2)
    fwd = 2 * (prop * 2 * m.num_prop_samples + nerf * m.num_nerf_samples)
    assert 1.5 * fwd < r["flops_per_ray"] < 3.5 * fwd


def _mlp(cfg):
    from mipnerf360 import model

    return model.build_model(cfg)


def test_cli_prints_one_line_ending_in_rays_per_s(capsys):
    args = ["bench", "--preset", "tiny", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
    extra = ["--device", "cpu", "--compile", "off", "--precision", "bf16", "train.seed=3"]
    assert cli.main(args + extra) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    line = out[0]
    assert re.search(r"[0-9.]+ rays/s$", line), line
    assert re.search(r"peak memory [0-9]+ MB", line), line
    for part in ("preset=tiny", "device=cpu", "batch=8", "compile=off", "precision=bf16"):
        assert part in line
    assert "train.seed=3" in line
    # the benchmark tables read the line back (bench.read_result)
    fields = bench.RESULT_LINE.search(line).groupdict()
    assert fields["device"].startswith("cpu (")
    assert (fields["batch"], fields["compile"], fields["precision"]) == ("8", "off", "bf16")
    assert float(fields["rays"]) > 0 and float(fields["ms"]) > 0 and fields["mflop"] is None


def test_read_result_names_what_is_missing(tmp_path):
    assert bench.read_result(tmp_path / "none.out") == "not run"
    (tmp_path / "bad.out").write_text("x\nmipnerf360 bench: error: --device cuda: no CUDA\n")
    assert bench.read_result(tmp_path / "bad.out").startswith("failed: mipnerf360 bench: error")
    (tmp_path / "cut.out").write_text("compiling...\n")
    assert bench.read_result(tmp_path / "cut.out") == "failed or timed out"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--batch-size", "0"], "batch_size"),
        (["train.nope=1"], "nope"),
        (["--threads", "-2"], "--threads"),
    ],
)
def test_bad_values_are_one_line_config_errors(capsys, argv, message):
    code = cli.main(["bench", "--preset", "tiny", *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mipnerf360 bench: error:"), err
    assert message in err[0]


def test_bad_choices_and_missing_cuda():
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--precision", "fp8"])
    with pytest.raises(configs.ConfigError, match="preset"):
        bench.main(["--preset", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(configs.ConfigError, match="CUDA"):
            bench.run_bench(bench.build_config("tiny", batch_size=4), device="cuda")


def test_flops_counter_state_is_separate():
    """--flops counts on its own model: the timed run starts from the same parameters."""
    cfg = bench.build_config("tiny", batch_size=8)
    a = bench.run_bench(cfg, steps=2, warmup=0, flops=True)
    b = bench.run_bench(cfg, steps=2, warmup=0)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


@pytest.mark.slow  # about two minutes: benchmarks/gpu.sh end to end on the CPU
def test_gpu_script_smoke_mode_writes_its_table(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "gpu.sh"
    out = tmp_path / "gpu"
    # The script shortens its later sections to hold a time budget; here every section must
    # run whatever the machine's load, so the budget is lifted (this is not a timed test).
    env = {**os.environ, "DEADLINE_S": "1200"}
    r = subprocess.run(
        ["bash", str(script), "--smoke", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = (out / "table.md").read_text()
    assert table.strip() in r.stdout
    for prec in ("fp32", "tf32", "bf16"):  # the eager rows carry numbers
        assert re.search(rf"\| {prec} \| off \| [0-9,]+ \| [0-9.]+ \| [0-9.]+ \|", table), table
    assert re.search(r"Matmul FLOPs per ray .*: [0-9.]+ M", table), table
    assert re.search(r"Bird test PSNR: [0-9.]+ dB", table), table
    assert re.search(r"projected [0-9.]+ h for 250k steps", table), table
    assert "Top-10 kernels" in table


def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_table_compares_each_row_with_fp32_eager_and_the_reference(tmp_path, capsys):
    rays = {}
    for name, prec in (("small_fp32_eager", "fp32"), ("small_bf16_eager", "bf16")):
        args = ["bench", "--preset", "tiny", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
        assert cli.main(args + ["--device", "cpu", "--compile", "off", "--precision", prec]) == 0
        line = capsys.readouterr().out
        (tmp_path / f"{name}.out").write_text(line)
        rays[prec] = float(bench.RESULT_LINE.search(line.strip())["rays"])
    (tmp_path / "rows.txt").write_text("small_fp32_eager\nsmall_bf16_eager\nsmall_fp32_compiled\n")
    table = _load_script("cpu_table")
    assert table.main([str(tmp_path)]) == 0
    rows = [ln.split("|") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert [r[3].strip() for r in rows[1:]] == ["fp32", "bf16", ""]
    fp32, bf16, missing = rows[1:]
    assert fp32[9].strip() == "1.00x"
    assert bf16[9].strip() == f"{rays['bf16'] / rays['fp32']:.2f}x"
    assert bf16[10].strip() == f"{rays['bf16'] / table.REFERENCE_RAYS_PER_S:.2f}x"
    assert "not run" in missing[8]
