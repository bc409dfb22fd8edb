"""Numbers typed by users: str.isdigit() is true for '²' and other non-ASCII digits, where int() then raises
ValueError (a 500 / a traceback), and for thousands of digits, where int() refuses to convert. Each must be the
usual 4xx / one-line error instead."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.orm import Session

from imsrc.api.search import search_options
from imsrc.catalog.repository import CategoryRepository
from imsrc.cli.search_commands import _options
from imsrc.errors import InvalidInputError

ODD = ["²", "٣", "1" * 5000]


@pytest.mark.parametrize("value", ODD)
def test_api_categories_fan_out_refuses_odd_digits(value: str) -> None:
    with pytest.raises(InvalidInputError, match="categories must be a positive integer"):
        asyncio.run(search_options(categories=value))  # a coroutine: FastAPI runs it without a thread


@pytest.mark.parametrize("value", ODD)
def test_cli_categories_fan_out_refuses_odd_digits(value: str) -> None:
    with pytest.raises(InvalidInputError, match="--categories must be a positive integer"):
        _options(None, value, None, False, "two_stage", None, None, False)


def test_category_named_by_odd_digits_is_simply_not_found(session: Session) -> None:
    assert CategoryRepository(session).resolve("²") is None
    assert CategoryRepository(session).resolve("\u0661") is None  # not category 1
