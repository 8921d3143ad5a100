"""Kubernetes resource quantities ("8", "500m", "48Gi", "1.5e3", "2E"): one parser for all of
llmray, and the pattern the CRDs check them with.

The grammar of k8s.io/apimachinery's resource.Quantity:

    <quantity>        ::= <signedNumber><suffix>
    <suffix>          ::= <binarySI> | <decimalExponent> | <decimalSI>
    <binarySI>        ::= Ki | Mi | Gi | Ti | Pi | Ei
    <decimalSI>       ::= n | u | m | "" | k | M | G | T | P | E
    <decimalExponent> ::= "e" <signedNumber> | "E" <signedNumber>

(the `kubernetes` client's `parse_quantity` does the same, but the API models may not import
that package: the trainer and server images do not have it).
"""

from __future__ import annotations

import re
from decimal import Decimal

# The OpenAPI pattern Kubernetes publishes for resource.Quantity, with an integer exponent
# (as its parser requires), e.g. matches "8", "+.5", "500m", "48Gi", "1.5e3", "2E".
PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]+))?$"
)
_VALID = re.compile(PATTERN)
_NUMBER_AND_SUFFIX = re.compile(r"([+-]?[0-9.]+)(.*)")  # on a valid quantity
_MULTIPLIER = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{f"{prefix}i": Decimal(2 ** (10 * (i + 1))) for i, prefix in enumerate("KMGTPE")},
}


def parse_quantity(value: int | str) -> Decimal:
    """The amount a quantity stands for, exactly: 8 -> 8, "500m" -> 0.5 (cores),
    "48Gi" -> 51539607552 (bytes), "1.5e3" -> 1500, "2E" -> 2 * 10**18."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    if isinstance(value, int):
        return Decimal(value)
    if not _VALID.fullmatch(value):
        raise ValueError(
            f'{value!r} is not a Kubernetes quantity (such as "8", "500m", "48Gi" or "1e3")'
        )
    number, suffix = _NUMBER_AND_SUFFIX.fullmatch(value).groups()  # type: ignore[union-attr]
    amount = Decimal(number)
    if not suffix:
        return amount
    if suffix in _MULTIPLIER:
        return amount * _MULTIPLIER[suffix]
    return amount.scaleb(int(suffix[1:]))  # e3, E-2: a decimal exponent
