"""mipnerf360.sampling: counter-based random rays, a pure function of (seed, step)."""

import numpy as np
import pytest
import torch

from mipnerf360 import camera, configs, datasets, sampling, synthetic
from mipnerf360.model import RAY_KEYS


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    out = tmp_path_factory.mktemp("scene") / "s360"
    synthetic.generate(out, kind="360", n_views=9, width=24, height=16, seed=0, factors=())
    cfg = configs.get_config("cpu")
    return datasets.load_scene(out, cfg.data)


def test_hash_mul32_is_exact_modular_arithmetic():
    x = torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0))
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF):
        got = sampling._mul32(x, c)
        assert got.tolist() == [(int(v) * c) % 2**32 for v in x]
        assert sampling._mul32(int(x[5]), c) == (int(x[5]) * c) % 2**32
    # ints and tensors hash alike (leading int words never become tensors)
    assert sampling.hash_words(3, 5, 7) == int(sampling.hash_words(3, 5, torch.tensor(7)))


def test_uniform_and_randint_are_uniform():
    keys = sampling.ray_keys(20200823, 5, torch.arange(1 << 16))
    assert keys.unique().numel() == keys.numel()  # the last mix is a bijection of the index
    u = sampling.uniform(keys, sampling.STREAM_JITTER, 4)
    assert u.shape == (1 << 16, 4) and u.dtype == torch.float32
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12**-0.5) < 0.005
    # columns (samples j) and streams are uncorrelated
    c = np.corrcoef(u.T.numpy())
    assert np.abs(c - np.eye(4)).max() < 0.02
    v = sampling.uniform(keys, sampling.STREAM_JITTER + 1, 1)[:, 0]
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], v]))[0, 1])) < 0.02
    counts = torch.bincount(sampling.randint(sampling.random_bits(keys, 1), 7), minlength=7)
    assert counts.min() > 0.95 * (1 << 16) / 7 and counts.max() < 1.05 * (1 << 16) / 7
    with pytest.raises(ValueError, match="high"):
        sampling.randint(keys, 0)


@pytest.mark.parametrize("batching", ["all_images", "single_image"])
def test_sample_is_a_pure_function_of_seed_and_step(scene, batching):
    a = sampling.RaySampler(scene, 64, "cpu", seed=3, batching=batching)
    b = sampling.RaySampler(scene, 64, "cpu", seed=3, batching=batching)
    s1 = a.sample(10)
    a.sample(11)
    for k, v in b.sample(10).items():  # no state: the order of calls does not matter
        assert torch.equal(v, s1[k]), k
    assert torch.equal(a.sample(torch.tensor(10))["origins"], s1["origins"])  # tensor step
    assert not torch.equal(a.sample(11)["rgb"], s1["rgb"])
    c = sampling.RaySampler(scene, 64, "cpu", seed=4, batching=batching)
    assert not torch.equal(c.sample(10)["rgb"], s1["rgb"])
    assert set(s1) == set(RAY_KEYS) | {"rgb", "key"}
    for k in ("origins", "directions", "viewdirs", "rgb"):
        assert s1[k].shape == (64, 3) and s1[k].dtype == torch.float32
    for k in ("radii", "near", "far"):
        assert s1[k].shape == (64, 1)
    assert s1["key"].dtype == torch.int64 and s1["key"].shape == (64,)
    assert torch.all(s1["near"] == scene.near) and torch.all(s1["far"] == scene.far)


@pytest.mark.parametrize("batching", ["all_images", "single_image"])
def test_ranks_get_contiguous_slices_of_the_global_batch(scene, batching):
    sampler = sampling.RaySampler(scene, 48, "cpu", seed=1, batching=batching)
    full = sampler.sample(7)
    for world in (2, 3, 4):
        parts = [sampler.sample(7, rank, world) for rank in range(world)]
        for k, v in full.items():
            assert torch.equal(torch.cat([p[k] for p in parts]), v), (world, k)
    with pytest.raises(configs.ConfigError, match="divisible"):
        sampler.sample(7, 0, 5)
    with pytest.raises(configs.ConfigError, match="rank"):
        sampler.sample(7, 2, 2)


def test_batching_modes_pick_images_like_the_reference(scene):
    n = len(scene.i_train)
    single = sampling.RaySampler(scene, 32, "cpu", seed=0, batching="single_image")
    cams = set()
    for step in range(1, 40):
        cam, x, y, _ = single.pixels(step)
        assert cam.unique().numel() == 1  # one image per batch
        cams.add(int(cam[0]))
        assert 0 <= int(x.min()) and int(x.max()) < scene.width
        assert 0 <= int(y.min()) and int(y.max()) < scene.height
    assert cams == set(range(n))
    every = sampling.RaySampler(scene, 4096, "cpu", seed=0)
    cam, x, y, _ = every.pixels(1)
    assert set(cam.tolist()) == set(range(n))
    assert set(x.tolist()) == set(range(scene.width))
    assert set(y.tolist()) == set(range(scene.height))
    # image, column and row are independent: 4096 draws cover the cells as expected
    pairs = set(zip(cam.tolist(), x.tolist(), y.tolist(), strict=True))
    cells = n * scene.width * scene.height
    assert len(pairs) > 0.9 * cells * (1 - np.exp(-4096 / cells))
    with pytest.raises(configs.ConfigError, match="batching"):
        sampling.RaySampler(scene, 8, "cpu", batching="random")
    with pytest.raises(configs.ConfigError, match="batch_size"):
        sampling.RaySampler(scene, 0, "cpu")


def test_rays_and_colours_are_those_of_the_picked_pixels(scene):
    """Each ray equals the one through its pixel of its (per-image) camera, rgb its colour."""
    sampler = sampling.RaySampler(scene, 256, "cpu", seed=2)
    batch = sampler.sample(3)
    cam, x, y, _ = sampler.pixels(3)
    idx = np.asarray(scene.i_train)[cam.numpy()]
    np.testing.assert_array_equal(batch["rgb"].numpy(), scene.images[idx, y.numpy(), x.numpy()])
    o, d, v, r, _ = camera.pixels_to_rays(
        x.numpy(),
        y.numpy(),
        scene.pixtocams[idx],
        scene.camtoworlds[idx],
        None if scene.distortion is None else scene.distortion[idx],
        scene.pixtocam_ndc,
        scene.camtype,
    )
    for k, ref in (("origins", o), ("directions", d), ("viewdirs", v), ("radii", r)):
        np.testing.assert_allclose(batch[k].numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=k)
    assert len(set(np.round(scene.pixtocams[:, 0, 0], 8))) > 1  # per-image intrinsics used


def test_sample_compiles_without_graph_breaks_and_matches_eager(scene):
    sampler = sampling.RaySampler(scene, 32, "cpu", seed=5)
    step = torch.tensor(9)
    explain = torch._dynamo.explain(sampler.sample)(step)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(sampler.sample, fullgraph=True, backend="eager")
    got, ref = compiled(step), sampler.sample(9)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
