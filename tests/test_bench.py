"""mipnerf360.bench: the throughput command runs real training steps and prints one line."""

import re

import pytest
import torch

from mipnerf360 import bench, cli, configs


def test_synthetic_batch_is_a_valid_ray_batch():
    cfg = configs.get_config("360")
    b = bench.synthetic_batch(cfg, 16, torch.device("cpu"))
    assert set(b) == {"origins", "directions", "viewdirs", "radii", "near", "far", "rgb"}
    assert b["origins"].shape == (16, 3) and b["near"].shape == (16, 1)
    torch.testing.assert_close(b["viewdirs"].norm(dim=-1), torch.ones(16))
    assert torch.all(b["near"] == 0.2) and torch.all(b["far"] == 1e6)
    assert b["rgb"].min() >= 0 and b["rgb"].max() <= 1


def test_run_bench_trains():
    r = bench.run_bench("tiny", batch_size=8, steps=2, warmup=1, compile="off")
    assert r["rays_per_s"] > 0 and r["sec_per_step"] > 0 and r["cpu_s_per_step"] > 0
    assert r["rays_per_s"] == pytest.approx(8 / r["sec_per_step"])
    assert r["params"] == 47_517 and r["compile"] is False
    assert r["loss"] > 0


def test_cli_prints_one_line_ending_in_rays_per_s(capsys):
    args = ["bench", "--preset", "tiny", "--batch-size", "8", "--steps", "1", "--warmup", "0"]
    assert cli.main(args + ["--device", "cpu", "--compile", "off"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    line = out[0]
    assert re.search(r"[0-9.]+ rays/s$", line), line
    for part in ("preset=tiny", "device=cpu", "batch=8", "compile=off"):
        assert part in line


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        bench.run_bench("tiny", batch_size=0)
    with pytest.raises(SystemExit):
        bench.main(["--preset", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            bench.run_bench("tiny", batch_size=4, device="cuda")
