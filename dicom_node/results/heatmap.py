"""Localization maps: smooth upsampling for drawing, and where a finding is marked on its image.

:func:`finding_mark` is the one rule the SR and the SC share: the rectangle around the map's
hot area when that area localizes the finding, else the single point where the map peaks (a
rectangle around most of the image tells a reader nothing).
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

#: A map cell is "hot" when it reaches this fraction of the map's maximum.
HOT_FRACTION = 0.5
#: A hot rectangle covering more than this fraction of the image does not localize.
MAX_REGION_FRACTION = 0.5


def upsample(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``heatmap`` resized to ``rows`` x ``columns`` (bicubic), clipped to [0, 1], float32."""
    image = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))
    resized = image.resize((columns, rows), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def hot_region_box(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray | None:
    """Closed rectangle around the map's hottest area, in image pixel coordinates.

    The hot area is the 4-connected set of cells at or above ``HOT_FRACTION`` of the
    maximum that contains the maximum. The map is taken to cover the whole image, so a
    cell spans ``rows / map_rows`` image rows. Returns five (column, row) points with
    (0, 0) at the top left corner of the top left pixel (PS3.3 C.18.6.1.1), or None for
    an empty map.
    """
    grid = np.asarray(heatmap, dtype=np.float32)
    if grid.ndim != 2 or grid.size == 0 or not np.isfinite(grid).all() or grid.max() <= 0:
        return None
    cells = _component_at_max(grid >= HOT_FRACTION * grid.max(), grid)
    cell_rows, cell_columns = zip(*cells, strict=True)
    scale_row, scale_column = rows / grid.shape[0], columns / grid.shape[1]
    top, bottom = min(cell_rows) * scale_row, (max(cell_rows) + 1) * scale_row
    left, right = min(cell_columns) * scale_column, (max(cell_columns) + 1) * scale_column
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return np.array(corners, dtype=np.float32)


def finding_mark(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray | None:
    """Where to mark a finding: its :func:`hot_region_box` (five points) when the box covers at
    most ``MAX_REGION_FRACTION`` of the image, else the map's peak (one point, the centre of the
    hottest cell), in image pixel coordinates (column, row); None for an empty map."""
    box = hot_region_box(heatmap, rows, columns)
    if box is None:
        return None
    width, height = box[1, 0] - box[0, 0], box[2, 1] - box[1, 1]
    if width * height <= MAX_REGION_FRACTION * rows * columns:
        return box
    grid = np.asarray(heatmap, dtype=np.float32)
    row, column = np.unravel_index(int(np.argmax(grid)), grid.shape)
    peak = ((column + 0.5) * columns / grid.shape[1], (row + 0.5) * rows / grid.shape[0])
    return np.array([peak], dtype=np.float32)


def _component_at_max(mask: np.ndarray, grid: np.ndarray) -> list[tuple[int, int]]:
    """Cells of the 4-connected component of ``mask`` that holds the maximum of ``grid``."""
    start = tuple(int(i) for i in np.unravel_index(int(np.argmax(grid)), grid.shape))
    seen = {start}
    queue = deque([start])
    while queue:
        row, column = queue.popleft()
        for r, c in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
            neighbour = (r, c)
            inside = 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]
            if inside and neighbour not in seen and mask[r, c]:
                seen.add(neighbour)
                queue.append(neighbour)
    return sorted(seen)
