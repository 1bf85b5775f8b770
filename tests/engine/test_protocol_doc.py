"""docs/protocol.md is the contract written out: every param and error code of the code is on it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import errors
from engine.backends.memory import MODEL_TOO_LARGE
from engine.protocol.schema import ASK_FIELDS, SCAN_FIELDS
from engine.tasks import TASKS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted({f.name for f in ASK_FIELDS + SCAN_FIELDS}))
def test_every_request_parameter_is_documented(name):
    assert f"`{name}`" in DOC


@pytest.mark.parametrize("code", sorted({v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
                                        | {MODEL_TOO_LARGE}))
def test_every_error_code_is_documented(code):
    assert re.search(rf"\| `{code}` \|", DOC)


def test_every_task_is_documented():
    assert all(f"`{task}`" in DOC for task in TASKS)
