"""The metrics of ADM's evaluator on precomputed features: FID/sFID from Gaussian statistics,
Inception Score from class probabilities, and k-NN precision/recall; beside them KID, and a paired
bootstrap of FID over samples."""
import warnings

import numpy as np
import torch
from scipy import linalg, sparse
from scipy.special import xlogy


def gaussian_statistics(features):
    """(mean, covariance) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), computed as ADM's evaluator does."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a):
    with warnings.catch_warnings():  # singular products are handled by the caller (ADM passes disp=False)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs, split_size=5000):
    """Mean over contiguous splits of exp(E_x KL(p(y|x) || p(y))), from class probabilities (N, C)."""
    return float(resampled_inception_scores(probs, np.ones((1, len(probs))), split_size)[0])


def resampled_inception_scores(probs, multiplicities, split_size=5000):
    """(resamples,) Inception Scores of the resamples of `probs` (N, C) that draw sample i multiplicities[r, i]
    times, each split (contiguous in i) averaging its own draws. KL(p_i || m) summed with weights w is
    w·(p_i log p_i) - W m·log m for the weighted marginal m; xlogy: a probability of exactly 0 contributes 0
    (ADM's formula would give nan there)."""
    probs = np.asarray(probs, dtype=np.float64)
    multiplicities = np.asarray(multiplicities, dtype=np.float64)
    neg_entropy = xlogy(probs, probs).sum(axis=1)
    scores = []
    for start in range(0, len(probs), split_size):
        part, weights = probs[start:start + split_size], multiplicities[:, start:start + split_size]
        total = weights.sum(axis=1)
        marginal = weights @ part / total[:, None]
        kl = weights @ neg_entropy[start:start + split_size] / total - xlogy(marginal, marginal).sum(axis=1)
        scores.append(np.exp(kl))
    return np.mean(scores, axis=0)


def _squared_distances(a, b):
    """Pairwise squared Euclidean distances between the rows of a and b."""
    d = a.square().sum(1, keepdim=True) - 2 * a @ b.t() + b.square().sum(1)
    return d.clamp_(min=0)


def knn_radii(features, k=3, block_size=10000):
    """Squared distance of each point to its k-th nearest neighbour, itself excluded (ADM takes entry k
    of its sorted distance row, whose entry 0 is the point itself). Only (block, block) distances are
    held at a time: a running k+1 smallest is merged over column blocks."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(features)}")
    radii = []
    for rows in features.split(block_size):
        nearest = torch.full((len(rows), k + 1), float("inf"), device=features.device)
        for cols in features.split(block_size):
            candidates = torch.cat([nearest, _squared_distances(rows, cols)], dim=1)
            nearest = candidates.topk(k + 1, dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _ball_blocks(ref_features, sample_features, k, block_size, device):
    """Yields (i, j, in_ref_balls, in_sample_balls) over (block, block) tiles: whether sample j + b lies in the
    ball of reference point i + a, and reference point i + a in the ball of sample j + b, each ball centred on a
    point with its k-th nearest neighbour (within its own set) on the boundary."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    sample = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    ref_radii, sample_radii = knn_radii(ref, k, block_size), knn_radii(sample, k, block_size)
    for i, ref_block in zip(range(0, len(ref), block_size), ref.split(block_size)):
        for j, sample_block in zip(range(0, len(sample), block_size), sample.split(block_size)):
            d = _squared_distances(ref_block, sample_block)
            yield i, j, d <= ref_radii[i:i + block_size, None], d <= sample_radii[None, j:j + block_size]


def precision_recall(ref_features, sample_features, k=3, block_size=10000, device=None):
    """ADM's k-NN precision and recall: precision is the fraction of samples inside at least one
    reference ball, recall the fraction of reference points inside at least one sample ball. ADM computes
    the distances in float16 when they fit; float32 here, which can differ only at near-exact ties."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sample_covered = torch.zeros(len(sample_features), dtype=torch.bool, device=device)
    ref_covered = torch.zeros(len(ref_features), dtype=torch.bool, device=device)
    for i, j, in_ref_balls, in_sample_balls in _ball_blocks(ref_features, sample_features, k, block_size, device):
        sample_covered[j:j + block_size] |= in_ref_balls.any(0)
        ref_covered[i:i + block_size] |= in_sample_balls.any(1)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()


def ball_coverage(ref_features, sample_features, k=3, block_size=10000, device=None):
    """What precision and recall count, kept per sample: (N,) whether each sample lies in some reference
    ball, and the sparse (M, N) matrix of which sample balls hold each reference point."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sample_covered = torch.zeros(len(sample_features), dtype=torch.bool, device=device)
    rows, cols = [], []
    for i, j, in_ref_balls, in_sample_balls in _ball_blocks(ref_features, sample_features, k, block_size, device):
        sample_covered[j:j + block_size] |= in_ref_balls.any(0)
        r, c = in_sample_balls.nonzero().cpu().numpy().T
        rows.append(r + i)
        cols.append(c + j)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    balls = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ref_features), len(sample_features)))
    return sample_covered.cpu().numpy(), balls


def resampled_precision_recall(sample_covered, balls, multiplicities):
    """(resamples,) precisions and recalls of the resamples that draw sample i multiplicities[r, i] times,
    the balls kept as the whole set draws them: a resample's recall counts the balls of the samples it draws."""
    multiplicities = np.asarray(multiplicities, dtype=np.float64)
    precision = multiplicities @ sample_covered / multiplicities.sum(axis=1)
    recall = (np.asarray(balls @ (multiplicities > 0).T) > 0).mean(axis=0)
    return precision, recall


def kernel_inception_distance(features_a, features_b, block_size=10000):
    """KID (Bińkowski et al., 2018): the unbiased estimate of the squared MMD between two feature sets
    (N, D) and (M, D) under the kernel k(x, y) = (x·y / D + 1)^3. Unlike FID it has no bias that depends
    on the sample count, so small sample sets compare fairly. Kernel sums go over (block, block) tiles."""
    a, b = (torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in (features_a, features_b))
    dim = a.shape[1]

    def kernel_sum(x, y):
        return sum(((rows @ cols.t()) / dim + 1).pow(3).sum().item()
                   for rows in x.split(block_size) for cols in y.split(block_size))

    def within(x):  # mean over pairs of distinct points
        diagonal = ((x * x).sum(1) / dim + 1).pow(3).sum().item()
        return (kernel_sum(x, x) - diagonal) / (len(x) * (len(x) - 1))
    return within(a) + within(b) - 2 * kernel_sum(a, b) / (len(a) * len(b))


def bootstrap_multiplicities(n, resamples=200, seed=0):
    """(resamples, n): how often each of n samples is drawn in each bootstrap resample; the same for the same
    arguments, so that statistics of sample sets sharing their indices stay paired."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])


def bootstrap_fids(ref_mu, ref_sigma, features, resamples=200, seed=0):
    """{name: (resamples,) FIDs} of sample sets that share their indices (images i of every set come
    from the same noise), each resample drawing the same indices for every set: differences and ratios
    of the returned values give paired bootstrap intervals."""
    lengths = {len(f) for f in features.values()}
    if len(lengths) != 1:
        raise ValueError(f"paired sample sets must have equal lengths, got {sorted(lengths)}")
    multiplicities = bootstrap_multiplicities(lengths.pop(), resamples, seed)
    return resampled_fids(ref_mu, ref_sigma, features, multiplicities)


def resampled_fids(ref_mu, ref_sigma, features, multiplicities):
    """{name: (resamples,) FIDs} of the resamples of each of `features` ({name: (N, D)}) that draw sample i
    multiplicities[r, i] times. The reference statistics stay fixed, so tr sqrt(S R) is taken as
    tr sqrt(R^1/2 S R^1/2), the eigenvalues of Z^T W Z / (N - 1) for the features Z centred and mapped by R^1/2,
    and each resample's statistics as multiplicity-weighted (W) sums: several times faster than resampling and
    a matrix root. Those are the nonzero eigenvalues of W^1/2 Z Z^T W^1/2 / (N - 1) too, the smaller matrix
    when N < D."""
    ref_mu, ref_sigma = np.asarray(ref_mu, dtype=np.float64), np.asarray(ref_sigma, dtype=np.float64)
    eigenvalues, vectors = np.linalg.eigh(ref_sigma)
    ref_root = (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T
    out = {}
    for name, f in features.items():
        f = np.asarray(f, dtype=np.float64)
        (n, dim), mapped = f.shape, f @ ref_root
        fids = []
        for weights, mu in zip(multiplicities, multiplicities @ f / n):
            centred = (mapped - mu @ ref_root) * np.sqrt(weights)[:, None]
            product = centred @ centred.T if n < dim else centred.T @ centred
            roots = np.sqrt(np.linalg.eigvalsh(product / (n - 1)).clip(min=0))
            trace = weights @ ((f - mu) ** 2).sum(axis=1) / (n - 1)
            diff = mu - ref_mu
            fids.append(diff @ diff + trace + np.trace(ref_sigma) - 2 * roots.sum())
        out[name] = np.array(fids)
    return out


def verdict(values, interval, null):
    """'differs' when the 95% interval excludes `null` and every value (one per seed) lies on the same side."""
    sides = {np.sign(v - null) for v in values}
    return "differs" if (interval[0] > null or interval[1] < null) and len(sides) == 1 else "no difference"
