"""k-means in NumPy (k-means++ seeding, Lloyd iterations, restarts) and the elbow rule.

Calibration clusters a few hundred to a few thousand multi-hot signatures, which takes
NumPy well under a second per k; no scikit-learn dependency is needed for that.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from coreinfer_jax.errors import CoreInferError

# The reference's automatic k: the elbow of the inertia curve over k = 1..10, at least 4.
AUTO_MAX_CLUSTERS = 10
AUTO_MIN_CLUSTERS = 4


@dataclasses.dataclass(frozen=True)
class KMeansFit:
    labels: np.ndarray  # int32 [N]: each point's nearest centroid
    centroids: np.ndarray  # float64 [k, F]
    inertia: float  # sum of squared distances of the points to their centroids


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """`[N, k]` squared Euclidean distances of points `x` `[N, F]` to `centroids` `[k, F]`."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]  # [N, k]
    return np.maximum(d, 0.0)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index `int32 [N]` of each point's nearest centroid, ties to the lowest index."""
    return squared_distances(x, centroids).argmin(1).astype(np.int32)


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared
    distance to the nearest centre chosen so far."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    d = squared_distances(x, x[chosen])[:, 0]  # [N]
    for _ in range(1, k):
        total = d.sum()
        # Fewer distinct points than k: any point will do (Lloyd then re-seeds empty clusters).
        i = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=d / total))
        chosen.append(i)
        d = np.minimum(d, squared_distances(x, x[i : i + 1])[:, 0])
    return x[chosen].astype(np.float64)


def _lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int) -> KMeansFit:
    k = len(centroids)
    labels = None
    for _ in range(max_iter):
        d = squared_distances(x, centroids)  # [N, k]
        new_labels = d.argmin(1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        sizes = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        own = d[np.arange(len(x)), labels]  # [N]
        for c in np.flatnonzero(sizes == 0):
            # An empty cluster restarts at the point farthest from its own centroid.
            far = int(own.argmax())
            own[far] = -1.0
            sizes[labels[far]] -= 1
            sums[labels[far]] -= x[far]
            labels[far] = c
            sizes[c], sums[c] = 1, x[far]
        centroids = sums / sizes[:, None]
    labels = nearest(x, centroids)
    inertia = float(squared_distances(x, centroids)[np.arange(len(x)), labels].sum())
    return KMeansFit(labels, centroids, inertia)


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 10, max_iter: int = 300) -> KMeansFit:
    """The lowest-inertia of `restarts` k-means++-seeded Lloyd runs on points `x` `[N, F]`.

    Deterministic for a given `(seed, k)`, whatever other k are fitted.
    """
    if not 1 <= k <= len(x):
        raise CoreInferError(f"cannot make {k} clusters of {len(x)} points")
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng([seed, k])
    fits = [_lloyd(x, _plus_plus(x, k, rng), max_iter) for _ in range(restarts)]
    return min(fits, key=lambda f: f.inertia)


def elbow(inertias: list[float]) -> int:
    """k at the elbow of the inertia curve for k = 1, 2, ...: the largest second difference.

    `inertias[j] - 2 inertias[j+1] + inertias[j+2]` is centred on k = j + 2.
    """
    if len(inertias) < 3:
        raise CoreInferError(f"the elbow rule needs inertias for at least 3 values of k, got {len(inertias)}")
    return int(np.argmax(np.diff(np.asarray(inertias, np.float64), 2))) + 2


def check_clusters(clusters: int | str, n: int) -> None:
    """Raise unless `clusters` can be fitted to `n` sentences (checked before their signatures)."""
    if clusters == "auto":
        if n < AUTO_MIN_CLUSTERS:
            raise CoreInferError(f"--clusters auto needs at least {AUTO_MIN_CLUSTERS} sentences, got {n}")
    elif isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= n:
        raise CoreInferError(f"clusters must be 'auto' or an integer in 1..{n} (the number of sentences), "
                             f"got {clusters!r}")


def choose_clusters(x: np.ndarray, clusters: int | str, seed: int = 0) -> tuple[KMeansFit, dict[int, float]]:
    """k-means of `x` `[N, F]` with `clusters` = k, or "auto": the elbow over k = 1..10, at
    least 4 (the reference's rule). Returns the fit and the inertia of every k fitted."""
    n = len(x)
    check_clusters(clusters, n)
    if clusters == "auto":
        fits = {k: kmeans(x, k, seed) for k in range(1, min(AUTO_MAX_CLUSTERS, n) + 1)}
        k = max(elbow([fits[k].inertia for k in sorted(fits)]), AUTO_MIN_CLUSTERS)
    else:
        k = clusters
        fits = {k: kmeans(x, k, seed)}
    return fits[k], {j: f.inertia for j, f in sorted(fits.items())}
