"""The cross-tile merge of a scene whose tiles arrive top to bottom, giving out instances once they are final.

:func:`rsiseg.data.merge.merge_scene_items` decides each item from the items its box overlaps:
fragments fuse, and duplicates suppress each other, only through overlapping boxes (a fused item's
mask lies in its parts' boxes). The items linked by chains of overlapping boxes (a *component*)
are therefore decided together and apart from every other item. When every tile whose window
starts above row ``frontier`` has been added, a component whose boxes all end at or above that row
can meet no later item, so merging it now gives exactly the items a merge of the whole scene at the
end would (the same instances; the order is band by band). Only the undecided components stay in
memory: about two tile rows of items when the overlap is at most half a tile, unless a chain of
overlapping boxes runs down the scene.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from rsiseg.data.merge import SceneItem, box_neighbours, merge_scene_items


class StreamingMerge:
    """:func:`merge_scene_items` over one ``height x width`` scene, fed tile by tile in row-major order.

    Args:
        height, width: scene size.
        stats: if given, the merge adds ``fused`` and ``suppressed`` to it.
        **merge_options: ``policy``, ``iou_threshold``, ``ios_threshold``, ``border_px``, ``fuse_ios``
            as :func:`merge_scene_items` takes them.

    Usage: ``add`` each tile's items; after the tiles that start above row ``r`` are all in,
    ``release(r)`` returns the instances that are final; ``release()`` at the end returns the rest.
    """

    def __init__(self, height: int, width: int, stats: dict[str, int] | None = None, **merge_options: Any) -> None:
        self.height, self.width = height, width
        self.stats = stats if stats is not None else {}
        self.merge_options = merge_options
        self.pending: list[SceneItem] = []

    def add(self, items: Iterable[SceneItem]) -> None:
        """Hold ``items`` (scene pixels, their tiles' windows set) until their component is final."""
        self.pending.extend(items)

    def release(self, frontier: float = math.inf) -> list[SceneItem]:
        """Merge and give out every pending component whose boxes end at or above row ``frontier``.

        Args:
            frontier: no item added later has a box starting above this scene row (``inf``: the
                scene is complete, everything is released).

        Returns:
            The merged instances of the released components. Pending items keep their order, so the
            instances do not depend on how the scene was cut into releases (their order does).
        """
        if math.isinf(frontier):
            final = np.ones(len(self.pending), dtype=bool)
        else:
            final = _component_bottoms(self.pending) <= frontier
        released = [item for item, done in zip(self.pending, final) if done]
        self.pending = [item for item, done in zip(self.pending, final) if not done]
        return merge_scene_items(released, self.height, self.width, stats=self.stats, **self.merge_options)


def _component_bottoms(items: list[SceneItem]) -> np.ndarray:
    """``float [N]``: for each item, the lowest box edge (``y + h``) of its component of overlapping boxes."""
    if not items:
        return np.zeros(0)
    neighbours = box_neighbours(items)
    rows = np.repeat(np.arange(len(items)), [len(n) for n in neighbours])
    cols = np.concatenate(neighbours).astype(np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(items), len(items)))
    _, labels = connected_components(graph, directed=False)
    bottoms = np.array([item.box[1] + item.box[3] for item in items], dtype=np.float64)
    lowest = np.full(labels.max() + 1, -math.inf)
    np.maximum.at(lowest, labels, bottoms)
    return lowest[labels]
