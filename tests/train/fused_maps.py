"""What every fused-map model (``map.fine_weight``, ``map.coarse_weight``) keeps, for its tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from haloae.train.anomaly_map import image_score
from haloae.train.inference import finish_maps, grid_error, raw_outputs


def fused_outputs(model, maps: int):
    """Run ``model`` (a tiny fitted one: 128 x 128 input, 16 x 16 grid) on 3 random images and
    check what every fused map keeps: ``maps`` position-normalised distances, the output map is
    the published map, the score is taken from the score map. Returns ``(x, z, up, amap,
    score_map)``: the images, the normalised grid maps, the same upsampled to the input, the
    output map and the score map."""
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    assert tuple(model.calibration.pos_mean.shape) == (1, maps, 16, 16)
    with torch.no_grad():
        grid = grid_error(model, x)
        score, amap = raw_outputs(model, x)
        score_map, published = finish_maps(model, grid)
    assert grid.shape == (3, maps, 16, 16)
    torch.testing.assert_close(amap, published)
    torch.testing.assert_close(score, image_score(score_map, model.cfg.map, model.calibration.score_mean_weight))
    z = model.calibration.position_normalize(grid)
    up = F.interpolate(z, size=(128, 128), mode="bilinear", align_corners=False)
    return x, z, up, amap, score_map
