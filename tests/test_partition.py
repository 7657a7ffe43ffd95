import pytest

from fedattn_vllm.partition import PartitionError, split_prompt

EXEMPLARS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
QUESTION = [20, 21]
WHOLE = [t for e in EXEMPLARS for t in e] + QUESTION


@pytest.mark.parametrize("policy", ["TokAg", "SemAg", "TokEx", "SemEx"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_segments_concatenate_to_the_prompt(policy, n):
    segments = split_prompt(EXEMPLARS, QUESTION, n, policy)
    assert len(segments) == n and all(segments)
    assert [t for s in segments for t in s] == WHOLE


def test_tokag_cuts_equal_token_chunks():
    assert split_prompt(EXEMPLARS, QUESTION, 3, "TokAg") == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 20, 21]]
    assert [len(s) for s in split_prompt(EXEMPLARS, QUESTION, 4, "TokAg")] == [3, 3, 3, 3]


def test_semag_deals_whole_exemplars_and_gives_the_question_to_the_last():
    assert split_prompt(EXEMPLARS, QUESTION, 2, "SemAg") == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 20, 21]]
    assert split_prompt(EXEMPLARS, QUESTION, 4, "SemAg") == [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 20, 21]]
    # fewer exemplars than participants: the last holds only the question
    assert split_prompt(EXEMPLARS[:2], QUESTION, 3, "SemAg") == [[1, 2, 3], [4, 5], [20, 21]]


def test_tokex_splits_exemplar_tokens_and_isolates_the_question():
    assert split_prompt(EXEMPLARS, QUESTION, 3, "TokEx") == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [20, 21]]


def test_semex_deals_whole_exemplars_and_isolates_the_question():
    assert split_prompt(EXEMPLARS, QUESTION, 3, "SemEx") == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [20, 21]]
    assert split_prompt(EXEMPLARS, QUESTION, 5, "SemEx")[-1] == QUESTION


@pytest.mark.parametrize(
    "exemplars, question, n, policy",
    [
        (EXEMPLARS, QUESTION, 6, "SemEx"),  # 4 exemplars cannot feed 5 participants
        (EXEMPLARS, QUESTION, 13, "TokAg"),  # more participants than tokens
        (EXEMPLARS, [], 2, "TokEx"),
        (EXEMPLARS, QUESTION, 0, "TokAg"),
    ],
)
def test_impossible_splits_raise(exemplars, question, n, policy):
    with pytest.raises(PartitionError):
        split_prompt(exemplars, question, n, policy)


def test_unknown_policy():
    with pytest.raises(ValueError):
        split_prompt(EXEMPLARS, QUESTION, 2, "Tok")
