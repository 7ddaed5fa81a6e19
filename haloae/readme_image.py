"""The README's picture: real detections of the exported model (the bundle through haloae.runtime).

One row per synthetic defect kind: the camera image | the anomaly heat map | the predicted
defect mask (the daemon's rule, `haloae.defect_mask`) with the true defect outlined in green.

    python -m haloae.readme_image BUNDLE_DIR docs/images/detection.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from .bundle import Bundle
from .defect_mask import defect_mask
from .preprocess import to_batch
from .runtime import Backend, load_backend


def _infer(backend: Backend, rgb: np.ndarray) -> tuple[float, np.ndarray]:
    scores, maps = backend.run(to_batch([rgb], backend.input_shape))  # [N], [N, 1, H, W]
    return float(scores[0]), maps[0, 0]


def _heat(amap: np.ndarray, size: int) -> np.ndarray:
    m = cv2.resize(amap, (size, size), interpolation=cv2.INTER_LINEAR)
    m = np.clip(m, 0.0, 1.0)  # normalised map: 0.5 is the pixel threshold
    return cv2.cvtColor(cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def write_detection_image(bundle: Path, out: Path, size: int = 256, seed: int = 11,
                          backend: str = "onnxruntime") -> Path:
    from haloae.synthetic import DEFECT_KINDS, sample

    opened = Bundle.open(Path(bundle))
    runner = load_backend(opened, backend, device="cpu")
    pixel_threshold = opened.manifest.threshold.pixel
    rows = []
    for i, kind in enumerate(DEFECT_KINDS):
        rgb, truth = sample(np.random.default_rng([seed, i]), size, kind)
        score, amap = _infer(runner, rgb)
        pred = cv2.resize(defect_mask(amap, pixel_threshold).astype(np.uint8) * 255, (size, size),
                          interpolation=cv2.INTER_NEAREST)  # the daemon's mask rule
        pred_rgb = np.repeat(pred[..., None], 3, axis=2)
        contours, _ = cv2.findContours(truth, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(pred_rgb, contours, -1, (0, 200, 0), 1)
        tiles = [rgb.copy(), _heat(amap, size), pred_rgb]
        cv2.putText(tiles[0], f"{kind}  score {score:.2f}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    runner.close()
    grid = np.concatenate(rows, axis=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(write_detection_image(args.bundle, args.out))


if __name__ == "__main__":
    main()
