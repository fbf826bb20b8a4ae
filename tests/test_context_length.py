"""komt.generate.context_length: the one rule the library, the CLI and the server apply to a request."""

from __future__ import annotations

import pytest

from komt.errors import GenerationError
from komt.generate.context_length import check_context_length


@pytest.mark.parametrize("n_prompt, max_new_tokens", [(1, 0), (10, 6), (15, 1)])
def test_a_prompt_and_budget_within_the_context_pass(n_prompt, max_new_tokens):
    check_context_length(n_prompt, max_new_tokens, context=16)


def test_a_prompt_that_fills_the_context_leaves_no_room():
    with pytest.raises(GenerationError, match=r"^the prompt has 16 tokens; the model's context is 16 tokens"):
        check_context_length(16, 0, context=16)


def test_a_budget_past_the_room_left_names_the_largest_that_fits_in_the_callers_words():
    with pytest.raises(GenerationError) as err:
        check_context_length(10, 7, context=16, what="the message", limit="--max-new-tokens")
    assert str(err.value) == ("the message has 10 tokens and --max-new-tokens is 7: together past the model's "
                              "context of 16; use --max-new-tokens 6 or less")


def test_the_caller_chooses_the_error():
    class Refused(Exception):
        pass

    with pytest.raises(Refused, match="'max_tokens' is 99"):
        check_context_length(10, 99, context=16, limit="'max_tokens'", error=Refused)
