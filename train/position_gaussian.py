"""Position-wise Gaussian of HaloAE reconstruction residuals (``map.error: gaussian``).

The paper's anomaly map (Mathian et al., arXiv 2208.03486) is the channel mean of the squared
reconstruction error, which weighs every feature direction alike. Normal residuals are far
from isotropic and differ from place to place on an aligned part (a tile edge, a chamfer, a
print), so this module models them per grid position, as PaDiM does for raw features (Defard
et al., arXiv 2011.08785): mean and covariance of the residual ``r = F - F_hat`` of the normal
training images at every position. The error of a new residual is its distance in the
``rank`` directions of LEAST normal variance (Rippel et al., "Modeling the Distribution of
Normal Data in Pre-Trained Deep Features for Anomaly Detection", arXiv 2005.14140, found that
these carry the anomaly signal; they also make the head cheaper): with the eigenvectors
``v_j`` and eigenvalues ``l_j`` of the covariance (ascending),

    e(p) = sqrt( mean_{j < rank} ((r_p - mu_p) . v_j)^2 / l_j ).

``share`` s > 1 pools the covariance over s x s neighbouring positions (the mean stays per
position): the s^2 positions of a cell share one whitening, estimated from s^2 times as many
samples, and the projection holds s^2 times fewer weights. At batch 1 the projection is read
once per frame, so its bytes are what the Gaussian costs on a CPU. On MTD 2x2 cells cost crack
and pixel AUROC (docs/benchmarks.md, lever row 31: the covariance is local), so the shipped
configs keep 1.

With every direction kept (``rank`` 0, the shipped ``edge``) any factor ``W`` with
``W W^T = cov^-1`` gives the same distance, so the projection is stored upper-triangular (a
Cholesky factor: column j reads only the first j + 1 channels) and applied in
``TRIANGLE_BLOCKS`` column blocks, block b reading only the channel prefix it needs. The
weights read per frame fall to (B + 1) / 2B of the dense matrix (5/8 for 4 blocks: 127 ->
80 MB on MTD; docs/benchmarks.md, latency), the distance is the same to fp32 rounding, and a
checkpoint saved with the older dense eigenvector projection is converted when it loads.

``fine`` m > 0 (``map.fine_weight``, the first m channels are the finer backbone layers'): the
forward also returns the distance over those channels alone, as a second map channel. It costs
no weights: with ``U`` upper-triangular and ``U U^T = cov^-1``, ``cov = L L^T`` for the lower
``L = U^-T``, so the leading m x m block of ``U`` whitens the leading block of ``cov`` (the
prefix channels' own covariance), and a column block ends at m so that distance is the sum of
the blocks before it.

``coarse`` c > 0 (``map.coarse_weight``): a second, nested Gaussian models the residual averaged
over each of c x c cells (AveragePool), per cell; its distance, bilinearly upsampled to the grid,
is the last output channel. A large, diffuse defect (uneven texture, a shading fault) moves the
mean residual of its cell while each position stays near its normal spread (docs/benchmarks.md
row 46). Its weights are c^2 / P of the position-wise ones.

All statistics are registered buffers (checkpoint state dict and exported graph; the blocks
are non-persistent copies cut from ``proj``). Export: Gather (channel subset), Reshape,
Transpose, Sub, Slice, batched MatMul [P/s^2, s^2 N, d_b] x [P/s^2, d_b, k_b], Mul,
ReduceSum, Add, Sqrt (with ``coarse``: AveragePool, Resize, Concat) - static shapes,
TensorRT-common. The projection is pre-scaled so that
the sum of squares stays far below the fp16 maximum.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import CalibrationError
from .config import ModelCfg

_LOG = logging.getLogger(__name__)

FP16_SCALE = 16.0  # z / FP16_SCALE is squared: fp16-safe up to |z| ~ 4000 per direction
TRIANGLE_BLOCKS = 4  # column blocks of a full-rank projection (4: 5/8 of the dense weights)


def block_bounds(dims: int, fine: int = 0) -> list[tuple[int, int]]:
    """Column blocks ``(start, end)`` of a triangular projection: ``TRIANGLE_BLOCKS`` of equal
    width, or with ``fine`` the first ``fine`` columns and the rest, each cut into about as many
    blocks as their share of the columns (a block ends at ``fine``, so the fine distance is the
    sum of the blocks before it)."""
    if not fine:
        step = -(-dims // TRIANGLE_BLOCKS)
        return [(a, min(a + step, dims)) for a in range(0, dims, step)]
    nf = max(1, min(TRIANGLE_BLOCKS - 1, round(TRIANGLE_BLOCKS * fine / dims)))
    out = []
    for lo, hi, nb in ((0, fine, nf), (fine, dims, TRIANGLE_BLOCKS - nf)):
        cuts = [lo + round(i * (hi - lo) / nb) for i in range(nb + 1)]
        out += [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    return out


def upper_factor(proj: torch.Tensor) -> torch.Tensor:
    """[..., d, d] whitening ``W`` -> upper-triangular ``U`` with ``U U^T = W W^T`` (float64
    inside), so ``|x U| = |x W|`` for every row vector ``x`` and column j of ``U`` reads only
    ``x[:j + 1]``. Cholesky of the flipped matrix: ``J M J = L L^T`` gives ``M = (J L J)(J L J)^T``."""
    w = proj.double()
    m = w @ w.transpose(-1, -2)
    lower = torch.linalg.cholesky(m.flip(-1, -2))
    return lower.flip(-1, -2).to(proj.dtype)


def is_upper(proj: torch.Tensor) -> bool:
    return bool((torch.tril(proj, diagonal=-1) == 0).all())


class PositionGaussian(nn.Module):
    """Residual [N, C, gh, gw] -> error [N, M, gh, gw]: channel 0 the distance; with ``fine`` next
    the distance over the first ``fine`` channels alone; with ``coarse`` last the distance of
    the c x c cells' mean residuals, upsampled (see module doc). `fit` it first."""

    def __init__(self, channels: int, grid_hw: tuple[int, int], dims: int = 0, rank: int = 0,
                 eps: float = 0.01, seed: int = 0, share: int = 1, fine: int = 0,
                 coarse: int = 0) -> None:
        super().__init__()
        if coarse and (coarse < 0 or grid_hw[0] % coarse or grid_hw[1] % coarse):
            raise ValueError(f"position-wise Gaussian: coarse={coarse} cells per side must divide the grid "
                             f"{grid_hw[0]}x{grid_hw[1]}")
        self.pool = (grid_hw[0] // coarse, grid_hw[1] // coarse) if coarse else None
        # the cells' own Gaussian (a child module: its buffers are gaussian.coarse.*)
        self.coarse = PositionGaussian(channels, (coarse, coarse), dims, rank, eps, seed) if coarse else None
        d = channels if dims <= 0 else min(dims, channels)
        k = d if rank <= 0 else min(rank, d)
        if fine and (d != channels or k != d or not 0 < fine < d):
            raise ValueError(f"position-wise Gaussian: fine={fine} needs every channel and direction "
                             f"(dims {d} of {channels}, rank {k}) and 0 < fine < {d}")
        self.fine = fine
        if share < 1 or grid_hw[0] % share or grid_hw[1] % share:
            raise ValueError(f"position-wise Gaussian: share={share} must divide the grid "
                             f"{grid_hw[0]}x{grid_hw[1]}; use 1 or a divisor of both sides")
        self.grid_hw, self.channels, self.dims, self.rank, self.eps = grid_hw, channels, d, k, eps
        self.share = share
        p = grid_hw[0] * grid_hw[1]
        gen = torch.Generator().manual_seed(seed)
        index = torch.arange(channels) if d == channels else \
            torch.randperm(channels, generator=gen)[:d].sort().values
        self.subset = d != channels
        self.register_buffer("index", index)
        self.register_buffer("mean", torch.zeros(p, 1, d))
        self.register_buffer("proj", torch.zeros(p // share ** 2, d, k))  # one per cell
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.blocks: list[int] = []  # the channel prefix each column block reads; [] = dense
        self.register_load_state_dict_post_hook(lambda module, _keys: module._triangulate())

    def _triangulate(self) -> None:
        """Make a full-rank projection upper-triangular and cut it into prefix blocks (the
        non-persistent ``proj_block<i>`` buffers the forward reads); leave a reduced rank dense."""
        for name in [n for n, _ in self.named_buffers() if n.startswith("proj_block")]:
            delattr(self, name)
        self.blocks = []
        if self.rank != self.dims or not bool(self.fitted):
            return
        if not is_upper(self.proj):
            self.proj.copy_(upper_factor(self.proj))
        for i, (start, end) in enumerate(block_bounds(self.dims, self.fine)):
            self.blocks.append(end)
            self.register_buffer(f"proj_block{i}", self.proj[:, :end, start:end].clone(),
                                 persistent=False)

    @classmethod
    def for_config(cls, channels: int, cfg: ModelCfg, fine: int = 0) -> "PositionGaussian":
        """The Gaussian of ``cfg.map``; ``fine``: the finer layers' channel count (used when
        ``map.fine_weight`` > 0)."""
        m = cfg.map
        return cls(channels, cfg.backbone.grid_hw, m.gaussian_channels, m.gaussian_rank,
                   m.gaussian_eps, share=m.gaussian_share, fine=fine,
                   coarse=m.coarse_cells if m.coarse_weight > 0 else 0)

    @property
    def maps(self) -> int:
        """Output channels M: the distance, + the fine one, + the coarse cells' one."""
        return 1 + bool(self.fine) + (self.coarse is not None)

    def _pooled(self, r: torch.Tensor) -> torch.Tensor:
        """[N, C, gh, gw] -> the cells' mean residuals [N, C, c, c]."""
        return F.avg_pool2d(r, self.pool, self.pool)

    def _positions(self, r: torch.Tensor) -> torch.Tensor:
        """[N, C, gh, gw] -> [P, N, d] (the channel subset at every position)."""
        if self.subset:
            r = r.index_select(1, self.index)  # N, d, gh, gw
        n = r.shape[0]
        return r.reshape(n, self.dims, -1).permute(2, 0, 1)  # P, N, d

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        """[P, ..., d] (positions row-major) -> [P / s^2, s^2, ..., d]: the s x s cells."""
        s, (gh, gw) = self.share, self.grid_hw
        rest = x.shape[1:]
        if s == 1:  # no cells: a transpose of two size-1 axes would still be a copy in the graph
            return x.unsqueeze(1)
        x = x.reshape(gh // s, s, gw // s, s, *rest).transpose(1, 2)  # gh/s, gw/s, s, s, ...
        return x.reshape(gh * gw // s ** 2, s * s, *rest)

    @torch.no_grad()
    def fit(self, residuals: Iterable[torch.Tensor]) -> dict:
        """Fit on batches of normal residuals [B, C, gh, gw] (float64 sums, chunked); returns
        a summary {images, dims, rank, min_eigenvalue, kept_variance}."""
        n, s1, s2, pooled = 0, None, None, []
        for r in residuals:
            if self.coarse is not None:  # small ([B, C, c, c]): kept for the cells' Gaussian
                pooled.append(self._pooled(r.detach().to("cpu", torch.float32)))
            x = self._positions(r.detach().to("cpu", torch.float64))  # P, B, d
            s1 = x.sum(1) if s1 is None else s1 + x.sum(1)  # P, d
            xx = x.transpose(1, 2) @ x  # P, d, d
            s2 = xx if s2 is None else s2 + xx
            n += x.shape[1]
        if n < 2:
            raise CalibrationError(f"the position-wise Gaussian needs at least 2 normal images, got {n}")
        if n * self.share ** 2 <= self.dims:
            _LOG.warning("position-wise Gaussian: %d training images for %d feature channels per "
                         "position: its covariance is singular and only eps=%g regularises it, so "
                         "expect a weaker map (docs/training.md, how many images); train on more "
                         "good images", n, self.dims, self.eps)
        mean = s1 / n  # P, d
        cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)  # P, d, d
        if self.share > 1:  # pooled within-position covariance of every s x s cell
            cov = self._cells(cov).mean(1)  # P / s^2, d, d
        cov += self.eps * torch.eye(self.dims, dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(cov)  # ascending: the least-variance directions first
        evals, evecs = evals[:, : self.rank], evecs[:, :, : self.rank]
        proj = evecs / evals.clamp_min(self.eps).sqrt()[:, None, :]  # P, d, k: whitening
        proj = proj / (self.rank ** 0.5 * FP16_SCALE)  # sum of squares = mean / FP16_SCALE^2
        self.mean.copy_(mean[:, None, :].float())
        self.proj.copy_(proj.float())
        self.fitted.fill_(True)
        self._triangulate()  # full rank: stored as the triangular factor
        total = torch.diagonal(cov, dim1=1, dim2=2).sum(1)
        info = {"images": n, "dims": self.dims, "rank": self.rank, "share": self.share,
                "min_eigenvalue": float(evals[:, 0].min()),
                "kept_variance": float((evals.sum(1) / total).mean())}
        if self.coarse is not None:
            info["coarse"] = self.coarse.fit(pooled)
        _LOG.info("position-wise Gaussian on %d normal images: %d of %d channels, %d least-"
                  "variance directions (%.1f %% of the residual variance)", n, self.dims,
                  self.channels, self.rank, 100 * info["kept_variance"])
        return info

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        n = residual.shape[0]
        s, (gh, gw) = self.share, self.grid_hw
        x = self._positions(residual) - self.mean  # P, N, d
        x = self._cells(x).reshape(-1, s * s * n, self.dims)  # P/s^2, s^2 N, d (s = 1: P, N, d)
        sq_fine = None
        if self.blocks:  # upper-triangular: each column block reads its channel prefix only
            sq = None
            for i, end in enumerate(self.blocks):
                z = torch.matmul(x[:, :, :end], getattr(self, f"proj_block{i}"))
                part = z.pow(2).sum(dim=2)
                sq = part if sq is None else sq + part
                if end == self.fine:  # the prefix columns: the first `fine` channels' own distance
                    sq_fine = sq
        else:
            z = torch.matmul(x, self.proj)  # P/s^2, s^2 N, k: scaled whitened coordinates
            sq = z.pow(2).sum(dim=2)
            if self.fine:  # unfitted (dense) projection: the same columns, all zeros until fit
                sq_fine = z[:, :, :self.fine].pow(2).sum(dim=2)
        e = sq.sqrt() * FP16_SCALE  # RMS Mahalanobis over k directions
        if sq_fine is not None:  # RMS over its own fine directions: (sq_fine * k / fine) ** 0.5
            e = torch.stack([e, sq_fine.sqrt() * (FP16_SCALE * (self.rank / self.fine) ** 0.5)])
        e = e.reshape(-1, gh // s, gw // s, s, s, n).permute(5, 0, 1, 3, 2, 4)  # N, M, gh/s, s, gw/s, s
        e = e.reshape(n, -1, gh, gw)
        if self.coarse is not None:  # the cells' distance, bilinear to the grid, as the last channel
            ec = self.coarse(self._pooled(residual))  # N, 1, c, c
            e = torch.cat([e, F.interpolate(ec, size=(gh, gw), mode="bilinear", align_corners=False)], 1)
        return e


def check_fitted(gaussian: Optional[PositionGaussian], source: str) -> None:
    """Raise a clear error when a model with ``map.error: gaussian`` was never fitted."""
    if gaussian is not None and not bool(gaussian.fitted):
        raise CalibrationError(f"{source}: the position-wise Gaussian of map.error=gaussian was never "
                         "fitted; use the final.pt of a finished haloae-train run")
