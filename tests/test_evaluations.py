"""The evaluation package: the FID Inception (layout, outputs, weight checks), the metrics against
closed forms and brute force, the evaluator CLI on tiny .npz files, and the digits mode."""
import contextlib
import io
import json
import math
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluations import compare, evaluator, inception, metrics, small
from evaluations.small import digits_uint8, load_classifier, load_small_features, train_classifier
from evaluations.npz import open_images


@pytest.fixture(scope="module")
def random_state_dict():
    """A random FID Inception state dict in pytorch-fid's key layout, scaled (He init) so that different
    images still give different features after 90-odd layers."""
    state_dict = inception.build_fid_inception().state_dict()
    gen = torch.Generator().manual_seed(0)
    for name, tensor in state_dict.items():
        if name.endswith("weight") and tensor.dim() > 1:
            tensor.normal_(0, math.sqrt(2 / tensor[0].numel()), generator=gen)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5, generator=gen)
        elif name.endswith(("running_mean", "bias")):
            tensor.normal_(0, 0.1, generator=gen)
    return state_dict


@pytest.fixture(scope="module")
def weights_path(random_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception_random.pth"
    torch.save(random_state_dict, path)
    return str(path)


def random_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- Inception

def tf1_resize_reference(image, size):
    """TF1 resize_bilinear(align_corners=False) written out pixel by pixel, in float64."""
    h, w = image.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = i * h / size
        y0, dy = int(np.floor(y)), y - np.floor(y)
        for j in range(size):
            x = j * w / size
            x0, dx = int(np.floor(x)), x - np.floor(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def test_resize_follows_tf1_rule():
    image = torch.rand(1, 1, 5, 7) * 255
    ours = inception.resize_like_tf1(image, size=13)[0, 0].double().numpy()
    np.testing.assert_allclose(ours, tf1_resize_reference(image[0, 0].double().numpy(), 13), atol=1e-3)
    # The quirk matters: torch's half-pixel bilinear resize is a different image.
    torch_resized = F.interpolate(image, size=(13, 13), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.abs(torch_resized - ours).max() > 1
    same_size = torch.rand(2, 3, 299, 299) * 255
    assert torch.equal(inception.resize_like_tf1(same_size), same_size)


def test_inception_outputs(weights_path):
    model = inception.load_inception(weights_path)
    images = torch.tensor(random_images(3, 64, seed=0)).permute(0, 3, 1, 2).float()
    captured = {}
    model.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, inp, out: captured.setdefault("conv", out))
    with torch.no_grad():
        out = model(images)
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 2023) and out["logits"].shape == (3, 1008)
    # sFID features: the first 7 channels of mixed_6/conv, channels last.
    expected_spatial = captured["conv"][:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    torch.testing.assert_close(out["spatial"], expected_spatial, rtol=0, atol=0)
    # IS logits: pool_3 times the fc weight, without the (non-zero) bias.
    fc = model.net.fc
    assert fc.bias.abs().sum() > 0
    torch.testing.assert_close(out["logits"], out["pool"] @ fc.weight.t())
    assert (out["pool"][0] - out["pool"][1]).abs().max() > 1e-3  # different images, different features


def test_inception_weights_without_batchnorm_counters(random_state_dict, tmp_path):
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in random_state_dict.items() if not k.endswith("num_batches_tracked")}, path)
    model = inception.load_inception(str(path))
    torch.testing.assert_close(model.net.fc.weight, random_state_dict["fc.weight"], rtol=0, atol=0)


def test_inception_wrong_layout_is_named(random_state_dict, tmp_path):
    missing = dict(random_state_dict)
    del missing["Mixed_7c.branch_pool.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys: Mixed_7c\.branch_pool\.conv\.weight"):
        inception.load_inception(str(tmp_path / "missing.pth"))
    reshaped = {**random_state_dict, "fc.weight": torch.zeros(1000, 2048)}
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"wrong shapes: fc\.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        inception.load_inception(str(tmp_path / "reshaped.pth"))


def test_inception_hash_in_name_is_checked(weights_path, tmp_path):
    claimed = tmp_path / "pt_inception-2015-12-05-deadbeef.pth"
    os.link(weights_path, claimed)
    with pytest.raises(ValueError, match="its name says deadbeef"):
        inception.load_inception(str(claimed))


def test_inception_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = os.path.join(str(tmp_path), "checkpoints", inception.WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=f"at {expected} or pass --inception-weights"):
        inception.load_inception()


# ---------------------------------------------------------------- metrics

def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 32))
    mu, sigma = metrics.gaussian_statistics(features)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    fid = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert fid == pytest.approx(closed_form, rel=1e-10)


def test_fid_refuses_a_large_imaginary_part():
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_inception_score_bounds_and_splits():
    assert metrics.inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    one_hot = np.eye(4)[np.arange(12000) % 4]  # splits of 5000, 5000, 2000: each spread evenly
    assert metrics.inception_score(one_hot) == pytest.approx(4.0)
    halves = np.eye(4)[np.r_[np.arange(100) % 2, 2 + np.arange(100) % 2]]
    assert metrics.inception_score(halves, split_size=200) == pytest.approx(4.0)
    assert metrics.inception_score(halves, split_size=100) == pytest.approx(2.0)  # contiguous splits


def brute_force_precision_recall(ref, sample, k=3):
    def distances(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    ref_radii = np.sort(distances(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    sample_radii = np.sort(distances(sample, sample), axis=1)[:, k]
    cross = distances(ref, sample)
    precision = np.mean((cross <= ref_radii[:, None]).any(axis=0))
    recall = np.mean((cross <= sample_radii[None, :]).any(axis=1))
    return precision, recall, ref_radii


@pytest.mark.parametrize("block_size", [7, 16, 10000])
def test_precision_recall_matches_brute_force(block_size):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(60, 5))
    sample = rng.normal(size=(45, 5)) * 1.5 + 0.5
    precision, recall, ref_radii = brute_force_precision_recall(ref, sample)
    assert 0 < precision < 1 and 0 < recall < 1
    radii = metrics.knn_radii(torch.tensor(ref, dtype=torch.float32), block_size=block_size)
    np.testing.assert_allclose(radii.sqrt().numpy(), ref_radii, rtol=1e-4)
    assert metrics.precision_recall(ref, sample, block_size=block_size, device="cpu") == (precision, recall)


# ---------------------------------------------------------------- evaluator CLI

@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
    """A VIRTUAL_imagenet-style reference (images plus stored statistics, here all zero) and samples."""
    root = tmp_path_factory.mktemp("npz")
    paths = {"ref": str(root / "ref.npz"), "samples": str(root / "samples.npz")}
    zero_stats = {"mu": np.zeros(2048), "sigma": np.zeros((2048, 2048)),
                  "mu_s": np.zeros(2023), "sigma_s": np.zeros((2023, 2023))}
    np.savez(paths["ref"], arr_0=random_images(6, 32, seed=1), arr_1=np.arange(6), **zero_stats)
    np.savez(paths["samples"], arr_0=random_images(5, 32, seed=2))
    return paths


@pytest.fixture(scope="module")
def cli_run(npz_files, weights_path):
    """The evaluator's stdout (run in-process: a subprocess would add seconds of imports)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        evaluator.main([npz_files["ref"], npz_files["samples"], "--inception-weights", weights_path,
                        "--batch-size", "4", "--device", "cpu"])
    return stdout.getvalue()


def test_cli_prints_the_five_metrics_and_kid(cli_run, npz_files, weights_path):
    lines = cli_run.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall", "KID"]
    printed = {k: float(v) for k, v in (line.split(": ") for line in lines)}
    # Recompute from the network's outputs: against the stored all-zero reference statistics,
    # FID = ||mu||^2 + tr(sigma) of the samples' features (the reference images only set precision/recall).
    model = inception.load_inception(weights_path)
    cpu = torch.device("cpu")
    acts = evaluator.extract_features(open_images(npz_files["samples"]), model, 4, cpu, progress=False)
    ref_acts = evaluator.extract_features(open_images(npz_files["ref"]), model, 4, cpu, progress=False)
    for label, name in [("FID", "pool"), ("sFID", "spatial")]:
        mu, sigma = metrics.gaussian_statistics(acts[name])
        assert printed[label] == pytest.approx(mu @ mu + np.trace(sigma), rel=1e-5)
    assert printed["Inception Score"] == pytest.approx(metrics.inception_score(metrics.softmax(acts["logits"])))
    precision, recall = metrics.precision_recall(ref_acts["pool"], acts["pool"], device="cpu")
    assert (printed["Precision"], printed["Recall"]) == (precision, recall)
    assert printed["KID"] == pytest.approx(metrics.kernel_inception_distance(acts["pool"], ref_acts["pool"]), rel=1e-6)


def test_reference_statistics_are_computed_cached_and_reused(weights_path, tmp_path):
    ref_path = str(tmp_path / "ref.npz")
    np.savez(ref_path, arr_0=random_images(4, 16, seed=3))
    cpu = torch.device("cpu")
    stats = evaluator.inception_reference(open_images(ref_path), inception.load_inception(weights_path), 4,
                                          cpu, progress=False)
    with np.load(evaluator.stats_cache_path(ref_path)) as f:
        assert f["pool"].shape == (4, 2048) and f["sigma"].shape == (2048, 2048)
        assert f["mu_s"].shape == (2023,) and f["sigma_s"].shape == (2023, 2023)
        np.testing.assert_array_equal(f["mu"], stats["mu"])

    class MustNotRun(torch.nn.Module):
        weights_sha256 = inception.sha256_of(weights_path)

        def forward(self, images):
            raise AssertionError("the reference was recomputed instead of read from its cache")

    cached = evaluator.inception_reference(open_images(ref_path), MustNotRun(), 4, cpu, progress=False)
    np.testing.assert_array_equal(cached["sigma_s"], stats["sigma_s"])
    other_weights = MustNotRun()
    other_weights.weights_sha256 = "other"
    with pytest.raises(AssertionError, match="recomputed"):
        evaluator.inception_reference(open_images(ref_path), other_weights, 4, cpu, progress=False)
    later = os.path.getmtime(evaluator.stats_cache_path(ref_path)) + 10
    os.utime(ref_path, (later, later))  # the reference changed after its statistics were cached
    with pytest.raises(AssertionError, match="recomputed"):
        evaluator.inception_reference(open_images(ref_path), MustNotRun(), 4, cpu, progress=False)


def test_npz_images_are_streamed_in_batches(tmp_path):
    images = random_images(7, 5, seed=4)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images))
    for name in ("compressed.npz", "fortran.npz"):
        batches = list(open_images(str(tmp_path / name)).batches(3))
        assert [len(batch) for batch in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((5, 32, 32, 3), np.uint8)}, "no arr_0 image array"),
    ({"arr_0": np.zeros((5, 32, 32, 3), np.float32)}, "must be uint8"),
    ({"arr_0": np.zeros((5, 32, 32), np.uint8)}, r"must be N x H x W x 3"),
    ({"arr_0": np.zeros((5, 3, 32, 32), np.uint8)}, r"got shape \(5, 3, 32, 32\)"),
    ({"arr_0": np.zeros((5, 16, 16, 3), np.uint8)},
     "resolution mismatch: reference images are 32x32, samples are 16x16"),
])
def test_cli_rejects_bad_npz_before_any_work(arrays, message, npz_files, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    # A missing weight file would fail later: the npz error must come first.
    argv = [npz_files["ref"], str(bad), "--inception-weights", str(tmp_path / "absent.pth")]
    with pytest.raises(SystemExit, match=message):
        evaluator.main(argv)


# ---------------------------------------------------------------- digits mode

@pytest.fixture(scope="module")
def classifier_path():
    return small.shipped_classifier("digits")


def test_another_network_is_trained_where_missing_and_named_as_not_the_shipped_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(small.DATASETS, "digits", small.DATASETS["digits"]._replace(epochs=1))
    path = tmp_path / "new" / "classifier.pt"
    images, _ = digits_uint8()
    np.savez(tmp_path / "digits.npz", arr_0=images[:100])
    evaluator.main([str(tmp_path / "digits.npz"), str(tmp_path / "digits.npz"), "--features", "digits",
                    "--classifier", str(path), "--device", "cpu"])
    digest = inception.sha256_of(path)[:12]
    assert capsys.readouterr().out.splitlines()[0] == (f"Features: the digits network {path} (sha256 {digest}), "
                                                       "not the shipped network")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(open(small.shipped_classifier("digits"), "rb").read())
    assert small.network_name(str(copy), "digits").startswith("the shipped digits network digits_classifier.pt")


def test_a_missing_shipped_network_is_an_error_naming_the_command_that_retrains_it(tmp_path, monkeypatch):
    monkeypatch.setattr(small, "ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no shipped shapes network at .*: retrain it with "
                                                r"`python -m evaluations.small shapes`"):
        load_small_features(dataset="shapes")
    assert not os.listdir(tmp_path)


def test_digits_classifier_is_accurate(classifier_path):
    images, labels = digits_uint8()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8 and images.max() == 255
    model = load_classifier(classifier_path)
    with torch.no_grad():
        predictions = model(torch.tensor(images[..., :1]).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert (predictions.numpy() == labels).mean() > 0.98


def test_digits_classifier_training_is_deterministic(tmp_path):
    first, again, other = (train_classifier(str(tmp_path / f"{name}.pt"), seed=seed, epochs=1).state_dict()
                           for name, seed in [("first", 0), ("again", 0), ("other", 1)])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.1.weight"], other["head.1.weight"])
    saved = torch.load(tmp_path / "first.pt", weights_only=True)
    assert all(torch.equal(first[k], saved[k]) for k in first)


def test_digits_mode_end_to_end(classifier_path, tmp_path, capsys):
    images, _ = digits_uint8()
    np.savez(tmp_path / "digits.npz", arr_0=images[:300])
    evaluator.main([str(tmp_path / "digits.npz"), str(tmp_path / "digits.npz"), "--features", "digits",
                    "--device", "cpu"])
    captured = capsys.readouterr()
    network, *lines = captured.out.strip().splitlines()
    digest = inception.sha256_of(classifier_path)[:12]
    assert network == f"Features: the shipped digits network digits_classifier.pt (sha256 {digest})"
    assert [line.split(":")[0] for line in lines] == ["Inception Score", "FID", "Precision", "Recall", "KID"]
    assert "no sFID" in captured.err
    values = {k: float(v) for k, v in (line.split(": ") for line in lines)}
    assert abs(values["FID"]) < 1e-6 and values["Precision"] == 1.0 and values["Recall"] == 1.0
    assert values["KID"] < 0  # the unbiased estimate of 0 for identical sets: minus the mean off-diagonal excess
    assert values["Inception Score"] > 8  # confident predictions spread over the 10 classes


def test_small_features_have_no_dead_units(classifier_path):
    """Every feature varies over the real digits: none is a ReLU stuck at zero."""
    images, _ = digits_uint8()
    net = load_small_features(classifier_path)
    acts = evaluator.extract_features(open_images(images), net, 500, torch.device("cpu"), progress=False)["pool"]
    assert acts.shape == (1797, 128) and acts.std(0).min() > 1e-2


def test_kid_is_the_unbiased_mmd_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(loc=0.5, size=(5, 3))

    def k(x, y):
        return (x @ y / 3 + 1) ** 3
    within = [np.mean([k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j]) for x in (a, b)]
    across = np.mean([k(x, y) for x in a for y in b])
    expected = within[0] + within[1] - 2 * across
    assert metrics.kernel_inception_distance(a, b, block_size=2) == pytest.approx(expected, rel=1e-10)
    big = rng.normal(size=(2000, 4))  # unbiased: two samples of one distribution average to 0
    assert abs(metrics.kernel_inception_distance(big[:1000], big[1000:])) < 0.01


def test_paired_bootstrap_resamples_the_same_indices_for_every_set():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 4))
    ref_mu, ref_sigma = metrics.gaussian_statistics(rng.normal(size=(1000, 4)))
    fids = metrics.bootstrap_fids(ref_mu, ref_sigma, {"a": a, "same": a.copy(), "shifted": a + 1}, resamples=20,
                                  seed=0)
    assert np.array_equal(fids["a"], fids["same"])  # the same images: identical resamples, a zero difference
    draws = np.random.default_rng(0)  # every resample of seed 0, resampled and scored the plain way
    expected = [metrics.frechet_distance(*metrics.gaussian_statistics(a[draws.integers(0, 300, 300)]), ref_mu,
                                         ref_sigma) for _ in range(20)]
    assert fids["a"] == pytest.approx(expected, rel=1e-8)
    assert (fids["shifted"] > fids["a"]).all() and len(set(fids["a"].round(9))) > 1
    few = rng.normal(size=(3, 4))  # fewer samples than dimensions: the eigenvalues of the smaller product
    multiplicities = np.array([[1, 1, 1], [2, 0, 1]])
    assert metrics.resampled_fids(ref_mu, ref_sigma, {"few": few}, multiplicities)["few"] == pytest.approx(
        [metrics.frechet_distance(*metrics.gaussian_statistics(few[i]), ref_mu, ref_sigma) for i in ([0, 1, 2],
                                                                                               [0, 0, 2])], rel=1e-8)
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.bootstrap_fids(ref_mu, ref_sigma, {"a": a, "b": a[:10]})


def test_digits_mode_separates_real_digits_from_noise(classifier_path):
    images, _ = digits_uint8()
    noise = np.repeat(np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8), 3, axis=-1)
    real = evaluator.evaluate(images[:300], images[300:600], "digits", classifier=classifier_path,
                              device="cpu", progress=False)
    fake = evaluator.evaluate(images[:300], noise, "digits", classifier=classifier_path,
                              device="cpu", progress=False)
    assert "sfid" not in real
    assert fake["fid"] > 5 * real["fid"]
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    assert fake["precision"] < 0.1 and fake["recall"] < 0.1


def test_shapes_are_deterministic_and_striped_classes_carry_fine_detail():
    from data import SHAPE_NAMES, image_dataset, render_shapes
    images, labels = render_shapes(400, seed=3)
    again, _ = render_shapes(400, seed=3)
    assert images.shape == (400, 16, 16, 3) and images.dtype == np.uint8 and np.array_equal(images, again)
    assert set(labels) == set(range(2 * len(SHAPE_NAMES)))
    grey = images.astype(float).mean(-1)
    detail = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2))  # horizontal pixel-to-pixel change
    assert detail[labels >= len(SHAPE_NAMES)].mean() > 1.3 * detail[labels < len(SHAPE_NAMES)].mean()
    with pytest.raises(ValueError, match="16x16"):
        image_dataset("shapes", 32)


# ---------------------------------------------------------------- paired comparisons (evaluations.compare)

def sample_set(path, images, labels, **settings):
    """A sample set as sample_ddp.py writes it: images, labels and its settings as a 0-d JSON string."""
    recorded = dict(dict(global_seed=0, labels="uniform", noise_stream="evaluation"), **settings)
    np.savez(path, arr_0=images, arr_1=labels, settings=np.array(json.dumps(recorded)))
    return str(path)


def test_ball_coverage_and_resampled_metrics_match_plain_ones():
    rng = np.random.default_rng(0)
    ref, sample = rng.normal(size=(60, 5)), rng.normal(size=(45, 5)) * 1.5 + 0.5
    covered, balls = metrics.ball_coverage(ref, sample, block_size=16, device="cpu")
    precision, recall = metrics.precision_recall(ref, sample, device="cpu")
    assert (covered.mean(), (balls.getnnz(axis=1) > 0).mean()) == (precision, recall)
    draws = rng.integers(0, 45, (3, 45))
    multiplicities = np.stack([np.bincount(d, minlength=45) for d in draws])
    resampled_precision, resampled_recall = metrics.resampled_precision_recall(covered, balls, multiplicities)
    sample_radii = np.sort(np.sqrt(((sample[:, None] - sample[None]) ** 2).sum(-1)), axis=1)[:, 3]
    in_ball = np.sqrt(((ref[:, None] - sample[None]) ** 2).sum(-1)) <= sample_radii  # the whole set's balls
    for r, d in enumerate(draws):
        assert resampled_precision[r] == pytest.approx(covered[d].mean())
        assert resampled_recall[r] == pytest.approx(in_ball[:, np.unique(d)].any(axis=1).mean())
    probs = metrics.softmax(rng.normal(size=(45, 4)) * 3)
    assert metrics.resampled_inception_scores(probs, multiplicities, split_size=20) == pytest.approx(
        [np.mean([metrics.inception_score(probs[s][d[(d >= s.start) & (d < s.stop)] - s.start])
                  for s in (slice(0, 20), slice(20, 40), slice(40, 45))]) for d in draws])


def digits_sets(tmp_path, perturb):
    """The digits reference, a set of real digits and the same set perturbed, as paired sample sets."""
    images, labels = digits_uint8()
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=images[:600])
    a = sample_set(tmp_path / "a.npz", images[600:1000], labels[600:1000])
    b = sample_set(tmp_path / "b.npz", perturb(images[600:1000]), labels[600:1000])
    return ref, a, b


def test_compare_interval_covers_a_fixed_perturbation_and_is_zero_against_itself(tmp_path, capsys):
    ref, a, b = digits_sets(tmp_path, lambda x: (x * 0.8).astype(np.uint8))
    same = sample_set(tmp_path / "same.npz", np.load(a)["arr_0"], np.load(a)["arr_1"])
    results = compare.main([ref, a, b, same, "--features", "digits", "--device", "cpu", "--resamples", "50"])
    plain = {path: evaluator.evaluate(ref, path, "digits", device="cpu", progress=False) for path in (a, b)}
    for metric in ("fid", "is", "precision", "recall"):
        assert results["sets"][a][metric] == pytest.approx(plain[a][metric], rel=1e-6)
        diff, (low, high) = results["pairs"][(a, b)][metric]
        assert diff == pytest.approx(plain[b][metric] - plain[a][metric], rel=1e-6, abs=1e-9)
        assert low <= diff <= high
        assert results["pairs"][(a, same)][metric] == (0, (0, 0))
    diff, (low, high) = results["pairs"][(a, b)]["fid"]
    assert 0 < low < diff  # the darker digits are further from the reference, and the interval says so
    out = capsys.readouterr().out
    assert out.startswith("Features: the shipped digits network digits_classifier.pt")
    assert f"{b} - {a}: FID {diff:+.4f} [{low:+.4f}, {high:+.4f}]: differs" in out
    assert f"{same} - {a}: FID +0.0000 [+0.0000, +0.0000]: no difference" in out


@pytest.mark.parametrize("change, message", [
    (dict(settings=dict(global_seed=1)), "b.npz has global_seed 1, .*a.npz 0"),
    (dict(settings=dict(noise_stream="trajectories")), "b.npz has noise_stream 'trajectories', .*'evaluation'"),
    (dict(label_at=7), r"b.npz has label \d at sample 7, .*a.npz \d"),
])
def test_compare_refuses_sets_from_other_noise_or_labels_before_any_network(change, message, tmp_path,
                                                                           monkeypatch):
    ref, a, _ = digits_sets(tmp_path, lambda x: x)
    with np.load(a) as f:
        images, labels = f["arr_0"], f["arr_1"].copy()
    if "label_at" in change:
        labels[change["label_at"]] = (labels[change["label_at"]] + 1) % 10
    b = sample_set(tmp_path / "b.npz", images, labels, **change.get("settings", {}))
    monkeypatch.setattr(compare, "feature_network", pytest.fail)
    with pytest.raises(SystemExit, match=f"^error: not drawn from the same noise and labels: .*{message}$"):
        compare.main([ref, a, b, "--features", "digits"])


def test_compare_accepts_unverified_pairing_only_when_asked(tmp_path):
    ref, a, _ = digits_sets(tmp_path, lambda x: x)
    b = str(tmp_path / "b.npz")
    with np.load(a) as f:
        np.savez(b, arr_0=f["arr_0"], arr_1=f["arr_1"])
    argv = [ref, a, b, "--features", "digits", "--device", "cpu", "--resamples", "10"]
    with pytest.raises(SystemExit, match=r"^error: .*b.npz records no settings \(sample_ddp.py's seed, labels and "
                                         r"noise stream\): its pairing cannot be checked; pass --unverified-pairing "
                                         "to compare it anyway$"):
        compare.main(argv)
    assert compare.main([*argv, "--unverified-pairing"])["pairs"][(a, b)]["fid"] == (0, (0, 0))


def test_compare_with_inception_runs_end_to_end_and_caches_each_sets_features(cli_run, npz_files, weights_path,
                                                                              tmp_path, monkeypatch, capsys):
    images, labels = np.load(npz_files["samples"])["arr_0"], np.arange(5)
    a = sample_set(tmp_path / "a.npz", images, labels)
    b = sample_set(tmp_path / "b.npz", images // 2, labels)
    argv = [npz_files["ref"], a, b, "--inception-weights", weights_path, "--device", "cpu", "--resamples", "10"]
    results = compare.main(argv)
    printed = dict(line.split(": ") for line in cli_run.strip().splitlines())  # the evaluator on the same images
    for metric, label in [("fid", "FID"), ("sfid", "sFID"), ("is", "Inception Score"), ("precision", "Precision"),
                          ("recall", "Recall")]:
        assert results["sets"][a][metric] == pytest.approx(float(printed[label]), rel=1e-6)
    out = capsys.readouterr().out
    network = inception.sha256_of(weights_path)[:12]
    assert out.startswith(f"Features: Inception inception_random.pth (sha256 {network})")
    assert sum(line.startswith(f"{b} - {a}: ") for line in out.splitlines()) == 5
    assert sorted(p.name for p in tmp_path.glob("*.features.*.npz")) == [f"{n}.features.{network}.npz" for n in "ab"]

    def extracted(images, *args):
        raise AssertionError(f"features of {images.path} extracted again")
    monkeypatch.setattr(compare, "extract_features", extracted)  # every set's features come from the caches
    assert compare.main(argv)["pairs"] == results["pairs"]
    sample_set(a, images[::-1].copy(), labels)  # other bytes under the same name: its cache no longer holds
    with pytest.raises(AssertionError, match="a.npz extracted again"):
        compare.main(argv)
