"""Kubernetes quantities: one parser (llmray.api.quantity) for CPU, memory and the CRD check."""

from __future__ import annotations

from decimal import Decimal

import pytest
import re2

from llmray.api import parse_finetunejob
from llmray.api.quantity import PATTERN, parse_quantity
from llmray.api.validation import SpecError

# (quantity, amount): every suffix Kubernetes knows, and the exponent forms.
AMOUNTS = [
    (8, 8),
    ("8", 8),
    ("0.5", Decimal("0.5")),
    ("+.5", Decimal("0.5")),
    ("500m", Decimal("0.5")),
    ("250u", Decimal("0.00025")),
    ("100n", Decimal("1e-7")),
    ("2k", 2000),
    ("48M", 48 * 10**6),
    ("48G", 48 * 10**9),
    ("1T", 10**12),
    ("1P", 10**15),
    ("2E", 2 * 10**18),
    ("1Ki", 2**10),
    ("1.5Mi", 3 * 2**19),
    ("48Gi", 48 * 2**30),
    ("2Ti", 2 * 2**40),
    ("1Pi", 2**50),
    ("1Ei", 2**60),
    ("1.5e3", 1500),
    ("12E+2", 1200),
    ("1e-3", Decimal("0.001")),
]
NOT_QUANTITIES = ["", "Gi", "5K", "1ki", "1.2.3", "1 Gi", "1Gi\n", "1e", "e3", "1e1.5", "."]


@pytest.mark.parametrize(("quantity", "amount"), AMOUNTS)
def test_every_suffix_has_its_amount(quantity, amount):
    assert parse_quantity(quantity) == amount
    assert re2.fullmatch(PATTERN, str(quantity))  # what the API server checks: the same


@pytest.mark.parametrize("text", NOT_QUANTITIES)
def test_what_kubernetes_rejects_is_rejected(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)
    assert not re2.fullmatch(PATTERN, text)


def test_a_bad_quantity_in_a_spec_names_its_field():
    job = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j"},
        "spec": {
            "baseModel": {"uri": "models/tiny"},
            "dataset": {"train": "d.jsonl"},
            "compute": {"resourcesPerWorker": {"cpu": "2", "memory": "16GB"}},
        },
    }
    with pytest.raises(SpecError, match=r"spec\.compute\.resourcesPerWorker\.memory"):
        parse_finetunejob(job)
