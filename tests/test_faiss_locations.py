"""FaissModelIndex.where after a load from saved files: sorted NumPy arrays plus a small overlay of later changes
(16 bytes an image instead of ~150 in a dict; issue 16's per-worker memory). It must answer exactly like a dict."""

from __future__ import annotations

import numpy as np

from imsrc.search.faiss_locations import Locations


def test_locations_behave_like_the_dict_they_replace() -> None:
    rng = np.random.default_rng(3)
    parts = [(7, rng.permutation(np.arange(1, 200, 2))), (-1, np.array([400, 2, 300])), (9, np.zeros(0, np.int64))]
    where = Locations()
    where.load(parts)
    expected = {int(i): (c, p) for c, ids in parts for p, i in enumerate(ids.tolist())}
    assert len(where) == len(expected) == 103
    for image_id, loc in expected.items():
        assert where.get(image_id) == loc and image_id in where
    assert where.get(4) is None and 4 not in where and where.pop(4) is None
    # A move (pop, then a new location), a delete, an added image, and a re-add of the deleted one.
    for image_id, loc in [(5, None), (2, None), (1000, (9, 0)), (5, (9, 1))]:
        found = where.pop(image_id)
        assert found == expected.pop(image_id, None)
        if loc is not None:
            where[image_id] = loc
            expected[image_id] = loc
    assert where.pop(2) is None and 2 not in where  # popped once: gone, like dict.pop(k, None)
    where[7] = (9, 2)  # set without a pop first: replaces the bulk location
    expected[7] = (9, 2)
    assert len(where) == len(expected)
    assert all(where.get(i) == loc for i, loc in expected.items())
    assert where.pop(7) == (9, 2) and where.get(7) is None


def test_an_image_id_in_two_sub_indexes_is_refused() -> None:
    where = Locations()
    try:
        where.load([(1, np.array([3, 4])), (2, np.array([4]))])
    except ValueError as exc:
        assert "two sub-indexes" in str(exc)
    else:
        raise AssertionError("duplicate image id accepted")
