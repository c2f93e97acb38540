"""Sweep tables: one row per strategy, every cell filled, errors where measured."""

from fedpeft.sweep import partition_overrides, render_table, summarise


def test_table_has_a_row_per_strategy_even_without_aggregation_errors():
    results = [
        {"strategy": s, "partition": p, "seed": k, "accuracy": 0.5 + 0.1 * k, "bytes": 1000, "wall_s": 2.0,
         "aggregation_error": (0.25 if s == "fedit" else None)}
        for s in ("fedit", "custom") for p in ("iid", "natural") for k in (0, 1)
    ]
    table = summarise(results)
    assert table[("fedit", "iid")]["mean"] == 0.55
    text = render_table(table, {"name": "t"}, full=False)
    rows = [line for line in text.splitlines() if line.startswith("| fedit") or line.startswith("| custom")]
    assert len(rows) == 2
    assert rows[0].endswith("| 2.50e-01 |") and rows[1].endswith("| – |")
    assert "0.550 ± 0.071" in rows[1]


def test_partition_specs():
    assert partition_overrides("dirichlet:0.1") == ['data.partition="dirichlet"', "data.alpha=0.1"]
    assert partition_overrides("natural") == ['data.partition="natural"']
