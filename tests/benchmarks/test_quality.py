"""benchmarks/quality.py's plan of training cases for ``--variants``: no
held-out or validation label volume is ever trained on, and the builder's
own split still validates on the intended cases."""

import doctest

from benchmarks import quality
from tfds_kits19.kits19.kits19_dataset_builder import split_case_ids

LABELS = ["case_00002", "case_00003", "case_00004", "case_00005",
          "case_00010", "case_00021", "case_00030", "case_00040",
          "case_00400", "case_00403", "case_00409", "case_00418",
          "case_00430", "case_00433", "case_00442", "case_00451"]


def test_docstring_example():
    assert doctest.testmod(quality).failed == 0


def test_variants_keep_held_out_and_validation_labels_out_of_training():
    train, test = split_case_ids(LABELS)
    assert test == ["case_00010", "case_00403", "case_00442"]
    for variants in (1, 2, 3, 4):
        plan = quality.plan_training_ids(train[:-2], train[-2:], variants)
        builder_train, _ = split_case_ids(sorted(plan))
        validation = sorted(builder_train)[-2:]
        assert [plan[c] for c in validation] == [("case_00433", 0),
                                                 ("case_00451", 0)]
        trained = {plan[c][0] for c in sorted(builder_train)[:-2]}
        assert not trained & (set(test) | {"case_00433", "case_00451"})
        # Most of the wanted variants are there (the builder's test split
        # takes every fifth id; a variant or two may be dropped).
        assert len(plan) >= 11 * variants + 2 - 2


def test_test_cts_never_share_an_id_with_training_or_validation():
    train, test = split_case_ids(LABELS)
    trained = set(quality.plan_training_ids(train[:-2], train[-2:], 4))
    for cts in (1, 2, 3):
        plan = quality.plan_test_cts(test, cts)
        assert len(plan) == 3 * cts
        assert not set(plan) & trained
        assert {plan[c][0] for c in plan} == set(test)
        assert sorted(v for _, v in plan.values()) == sorted(
            list(range(cts)) * 3)


def test_test_cts_below_one_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        quality.main(["--test-cts", "0", "--no-write"])
    assert "--test-cts must be at least 1" in capsys.readouterr().err
