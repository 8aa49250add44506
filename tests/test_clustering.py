"""Clustering and the tree rule on data with known answers."""

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from treeseg_qgis.engine.core.clustering import choose_elbow, fit_clusters
from treeseg_qgis.engine.core.errors import InputError
from treeseg_qgis.engine.core.trees import check_tree_override, excess_green, tree_clusters_by_exg


def blobs(count: int, per: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (count, 8))
    return np.concatenate([c + rng.normal(0, 0.3, (per, 8)) for c in centres]).astype(np.float32)


@pytest.mark.parametrize("true_k", [3, 5])
def test_elbow_finds_the_number_of_blobs(true_k):
    model = fit_clusters(blobs(true_k), None, (2, 9))
    assert model.auto_k and model.k == true_k
    assert sorted(model.inertia_curve) == list(range(2, 10))


def test_fixed_k_is_kept():
    assert fit_clusters(blobs(3), 4).k == 4


def test_uniform_data_gives_the_smallest_k():
    uniform = np.ones((500, 8), np.float32)
    assert fit_clusters(uniform, None, (2, 8)).k == 1


def test_k_larger_than_distinct_features_is_capped():
    two_values = np.repeat(np.eye(8, dtype=np.float32)[:2], 100, axis=0)
    assert fit_clusters(two_values, 6).k == 2


def test_k_one_is_allowed():
    model = fit_clusters(blobs(3), 1)
    assert model.k == 1 and (model.assign(blobs(3)) == 0).all()


def test_elbow_on_a_flat_curve_takes_the_first_k():
    assert choose_elbow({2: 0.0, 3: 0.0, 4: 0.0}, total_variance=1.0) == 2


def test_excess_green_on_chromatic_coordinates():
    pixels = np.array([[0.2, 0.6, 0.2], [0.5, 0.5, 0.5], [0.6, 0.3, 0.1], [0, 0, 0]], np.float32)
    assert np.allclose(excess_green(pixels), [0.8, 0.0, -0.1, 0.0], atol=1e-6)
    assert excess_green(pixels * 0.3)[0] == pytest.approx(0.8)


def test_tree_rule_splits_green_clusters_from_soil():
    exg = np.array([0.25, 0.18, 0.01, -0.02, -0.05])
    weights = np.array([0.2, 0.1, 0.3, 0.2, 0.2])
    assert tree_clusters_by_exg(exg, weights) == [0, 1]


def test_tree_rule_finds_no_trees_without_vegetation():
    assert tree_clusters_by_exg(np.array([0.01, -0.02, -0.04]), np.array([0.3, 0.3, 0.4])) == []


def test_tree_override_is_checked_against_k():
    assert check_tree_override([2, 0, 2], 3) == [0, 2]
    with pytest.raises(InputError, match="0..2"):
        check_tree_override([5], 3)


def test_fitting_on_one_thread_leaves_the_callers_threads_as_they_were():
    """k-means runs on one OpenMP thread (clustering.py); the model's forward after it must keep all of them."""
    before = [(library["filepath"], library["num_threads"]) for library in threadpool_info()]
    model = fit_clusters(blobs(3), None, (2, 5))
    assert model.k == 3
    assert [(library["filepath"], library["num_threads"]) for library in threadpool_info()] == before
