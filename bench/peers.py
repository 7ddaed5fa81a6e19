"""Peer methods for the accuracy benchmark: PaDiM and PatchCore on HaloAE's Block A features.

Both take the SAME frozen features the HaloAE model reconstructs (``HaloAE.extract``:
[N, C, g, g] at the model's grid), so a comparison measures what Block C and the anomaly map add,
not a different backbone or resolution. Each returns an anomaly map at grid resolution; the
benchmark turns it into an image-size map with the same Gaussian smoothing and bilinear
upsampling as HaloAE (`haloae.train.anomaly_map.smooth_and_upsample`) and takes the image
score as the map maximum, as both papers do.

- PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
  and Localization", arXiv 2011.08785): ``dims`` randomly chosen channels, one Gaussian per grid
  position (mean + full covariance + ``eps`` * I), Mahalanobis distance.
- PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
  arXiv 2106.08265): a memory bank of every training patch feature, reduced by greedy coreset
  selection (distances in a random 128-dimensional projection, float16 updates to fit a CPU),
  the map = distance to the nearest bank entry, the image score re-weighted by the paper's
  neighbourhood rule (optional).

Numpy/torch only, CPU friendly; no training-code imports beyond torch.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

__all__ = ["Padim", "PatchCore"]


def _positions(feats: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [H*W, N, C] (one row of samples per grid position)."""
    n, c, h, w = feats.shape
    return feats.permute(2, 3, 0, 1).reshape(h * w, n, c)


class Padim:
    """Per-position Gaussian of ``dims`` random feature channels (see module doc)."""

    def __init__(self, dims: int = 100, eps: float = 0.01, seed: int = 0) -> None:
        self.dims, self.eps, self.seed = dims, eps, seed
        self.index: Optional[torch.Tensor] = None
        self.mean: Optional[torch.Tensor] = None  # [P, 1, d]
        self.inv_cov: Optional[torch.Tensor] = None  # [P, d, d]
        self.shape: tuple[int, int] = (0, 0)

    def fit(self, feats: torch.Tensor) -> "Padim":
        """Fit on normal features [N, C, H, W] (N >= 2)."""
        n, c, h, w = feats.shape
        if n < 2:
            raise ValueError(f"PaDiM needs at least 2 normal images, got {n}")
        gen = torch.Generator().manual_seed(self.seed)
        d = min(self.dims, c)
        self.index = torch.randperm(c, generator=gen)[:d].sort().values
        x = _positions(feats[:, self.index].double())  # P, N, d
        self.mean = x.mean(dim=1, keepdim=True)  # P, 1, d
        xc = x - self.mean
        cov = xc.transpose(1, 2) @ xc / (n - 1)  # P, d, d
        cov += self.eps * torch.eye(d, dtype=cov.dtype)
        self.inv_cov = torch.linalg.inv(cov).float()
        self.mean = self.mean.float()
        self.shape = (h, w)
        return self

    def predict(self, feats: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Mahalanobis distance map [N, 1, H, W] of features [N, C, H, W]."""
        if self.inv_cov is None:
            raise RuntimeError("PaDiM: call fit() first")
        out = []
        for lo in range(0, feats.shape[0], batch):
            x = _positions(feats[lo:lo + batch, self.index].float()) - self.mean  # P, B, d
            m = ((x @ self.inv_cov) * x).sum(-1).clamp_min(0).sqrt()  # P, B
            out.append(m.T.reshape(-1, 1, *self.shape))
        return torch.cat(out)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] (clamped at 0)."""
    return (a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def greedy_coreset(bank: torch.Tensor, size: int, proj_dim: int = 128, seed: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Indices of ``size`` rows of ``bank`` [M, C] chosen by greedy k-center selection.

    Distances are computed in a random Gaussian projection to ``proj_dim`` dimensions (as the
    PatchCore paper does) and the running minimum distance is kept in float16 to halve the
    memory traffic, which is what the selection costs on a CPU.
    """
    m = bank.shape[0]
    if size >= m:
        return torch.arange(m)
    gen = torch.Generator().manual_seed(seed)
    if bank.shape[1] > proj_dim:
        proj = torch.randn(bank.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)
        z = bank.float() @ proj
    else:
        z = bank.float()
    z_sq = z.pow(2).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(m, (1,), generator=gen))
    min_d = torch.full((m,), float("inf"), dtype=torch.float16)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=size, desc="PatchCore coreset", unit="pt", leave=False)
    for i in range(1, size + 1):
        c = z[chosen[i - 1]]
        d = (z_sq - 2.0 * (z @ c) + c.pow(2).sum()).clamp_min(0).half()
        torch.minimum(min_d, d, out=min_d)
        if i < size:
            chosen[i] = int(torch.argmax(min_d))
        if bar is not None and i % 256 == 0:
            bar.update(256)
    if bar is not None:
        bar.close()
    return chosen


class PatchCore:
    """Nearest-neighbour distance to a coreset of normal patch features (see module doc)."""

    def __init__(self, coreset: int = 16384, reweight: bool = True, neighbours: int = 9,
                 seed: int = 0, progress: bool = False) -> None:
        self.coreset, self.reweight, self.neighbours = coreset, reweight, neighbours
        self.seed, self.progress = seed, progress
        self.bank: Optional[torch.Tensor] = None
        self.fit_s = 0.0

    def fit(self, feats: torch.Tensor) -> "PatchCore":
        """Fit on normal features [N, C, H, W]."""
        t0 = time.perf_counter()
        c = feats.shape[1]
        all_patches = feats.permute(0, 2, 3, 1).reshape(-1, c).float()  # N*H*W, C
        idx = greedy_coreset(all_patches, self.coreset, seed=self.seed, progress=self.progress)
        self.bank = all_patches[idx].contiguous()
        self.fit_s = time.perf_counter() - t0
        return self

    def _nearest(self, q: torch.Tensor, k: int, chunk: int = 4096):
        vals, idx = [], []
        for lo in range(0, q.shape[0], chunk):
            d = _sq_dists(q[lo:lo + chunk], self.bank)
            v, i = d.topk(k, dim=1, largest=False)
            vals.append(v.sqrt())
            idx.append(i)
        return torch.cat(vals), torch.cat(idx)

    def predict(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [N], distance maps [N, 1, H, W]) of features [N, C, H, W]."""
        if self.bank is None:
            raise RuntimeError("PatchCore: call fit() first")
        n, c, h, w = feats.shape
        q = feats.permute(0, 2, 3, 1).reshape(-1, c).float()
        dist, nn_idx = self._nearest(q, 1)
        maps = dist[:, 0].reshape(n, 1, h, w)
        flat = dist[:, 0].reshape(n, h * w)
        s_star, arg = flat.max(dim=1)  # the most anomalous patch of every image
        if not self.reweight:
            return s_star, maps
        # paper eq. 7: weight by how isolated the matched bank entry is among its neighbours
        worst = q.reshape(n, h * w, c)[torch.arange(n), arg]  # N, C
        m_star = self.bank[nn_idx[:, 0].reshape(n, h * w)[torch.arange(n), arg]]  # N, C
        k = min(self.neighbours, self.bank.shape[0])
        _, nb = self._nearest(m_star, k)  # N, k: the neighbours of m* in the bank
        d_nb = (worst[:, None, :] - self.bank[nb]).norm(dim=-1)  # N, k
        w = 1.0 - torch.softmax(d_nb, dim=1)[:, 0]  # anomalib's form of the paper's weight
        return w * s_star, maps
