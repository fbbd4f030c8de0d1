"""Token importance drawn over the image as PNG heatmaps (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402


def token_grid(importance: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """Image-token importances (row-major over the patch grid) as a 2-D map.

    # importance: [N] -> map: [rows, cols]
    """
    rows, cols = grid_size
    if importance.shape != (rows * cols,):
        raise ValueError(f"importance has {importance.shape} values, the patch grid needs {rows * cols}")
    return importance.reshape(rows, cols)


def save_heatmap(image: np.ndarray, importance_map: np.ndarray, title: str, path: Path) -> Path:
    """Write the image with the importance map (nearest-upsampled, signed colours) on top.

    # image: [S, S, 3] uint8, importance_map: [rows, cols] -> PNG at `path`
    """
    limit = float(np.abs(importance_map).max()) or 1.0
    height, width = image.shape[:2]
    figure, axis = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    axis.imshow(image)
    overlay = axis.imshow(importance_map, cmap="coolwarm", vmin=-limit, vmax=limit, alpha=0.55,
                          extent=(0, width, height, 0), interpolation="nearest")
    figure.colorbar(overlay, ax=axis, fraction=0.046, pad=0.04)
    axis.set_title(title, fontsize=8)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
