"""RunState's early-stopping bookkeeping (mfa.em_state): patience within a stint, the
overall limit of 2·patience, and what a stint after a repeated search must reach."""

from __future__ import annotations

import pytest

from mfa.em_state import RunState


def _feed(state: RunState, scores, patience=3, counting=True, min_gain=0.0):
    """Track each score in turn (the clone is the score itself); returns the stop flags."""
    return [state.track_validation(lambda model: {"score": model}, value, value, counting,
                                   patience, min_gain) for value in scores]


def test_patience_counts_iterations_without_a_better_score():
    state = RunState()
    assert _feed(state, [1.0, 2.0, 1.5, 1.9, 1.8]) == [False] * 4 + [True]
    assert state.best_val_log_likelihood == 2.0 and state.best_val_params == {"score": 2.0}
    assert state.bad_iterations == 3 and state.stale_iterations == 3


def test_gains_below_min_gain_keep_their_parameters_but_do_not_restart_patience():
    """min_delta: 1.2, 1.4 and 1.45 each beat the best, but none is 0.5 above 1.0, where
    patience last restarted: three bad iterations; the best parameters are still the last."""
    state = RunState()
    assert _feed(state, [1.0, 1.2, 1.4, 1.45], min_gain=0.5) == [False] * 3 + [True]
    assert state.best_val_params == {"score": 1.45} and state.stint_best == 1.45
    assert state.stint_mark == 1.0 and state.bad_iterations == 3


def test_small_gains_that_add_up_to_min_gain_restart_patience():
    """1.6 is 0.6 above the mark 1.0 (after a bad 1.3); then 2.2 is 0.6 above 1.6: patience
    restarts at each, so the creep goes on."""
    state = RunState()
    assert _feed(state, [1.0, 1.3, 1.6, 1.7, 1.8, 2.2, 2.3], min_gain=0.5) == [False] * 7
    assert state.stint_mark == 2.2 and state.bad_iterations == 1
    # the same scores with min_gain 0 never count a bad iteration (each beats the last)
    plain = RunState()
    assert _feed(plain, [1.0, 1.3, 1.6, 1.7, 1.8, 2.2, 2.3]) == [False] * 7
    assert plain.bad_iterations == 0 and plain.stint_mark == plain.stint_best == 2.3


def test_iterations_that_do_not_count_do_not_use_up_patience():
    state = RunState()
    assert _feed(state, [2.0, 1.0, 1.0, 1.0, 1.0], counting=False) == [False] * 5
    assert state.bad_iterations == 0


def test_a_stint_climbing_from_below_the_best_runs_until_two_patiences():
    """After a repeated search, patience counts against the stint's own best; a stint that
    keeps climbing fast enough to reach the best but stays below it still ends 2·patience
    iterations after the switch, and then no further search is due."""
    state = RunState()
    _feed(state, [5.0, 4.0, 4.0, 4.0])
    state.search_again()
    assert state.val_at_search == 5.0 and state.stint_best is None
    flags = _feed(state, [1.0, 2.0, 3.0, 4.0, 4.9, 4.99])
    assert flags == [False] * 5 + [True]
    assert state.bad_iterations == 0 and state.stale_iterations == 6
    assert not state.stint_improved()
    assert state.best_val_params == {"score": 5.0}


def test_a_stint_whose_gains_would_not_reach_the_best_in_time_ends_early():
    """Climbing by 1, then 0.5 with 2 of its 2·patience iterations left and 1.5 to go: the
    latest gain kept up would not get there, so the stint is over."""
    state = RunState()
    _feed(state, [5.0, 4.0, 4.0, 4.0])
    state.search_again()
    assert _feed(state, [1.0, 2.0, 3.0, 3.5]) == [False] * 3 + [True]
    assert state.stint_gain == 0.5 and state.stale_iterations == 4


def test_a_stint_that_stops_improving_on_itself_ends_after_half_the_patience():
    """Before any repeated search the whole patience applies; a stint after one is over
    once it has not climbed for patience // 2 iterations."""
    state = RunState()
    assert _feed(state, [5.0, 4.0, 4.0, 4.0, 4.0], patience=4) == [False] * 4 + [True]
    state.search_again()
    assert _feed(state, [4.5, 4.0, 4.2], patience=4) == [False, False, True]
    assert not state.stint_improved()


def test_a_stint_that_beats_the_best_earns_another_search():
    state = RunState()
    _feed(state, [5.0, 4.0, 4.0, 4.0])
    state.search_again()
    assert _feed(state, [4.0, 4.9, 5.5, 5.7, 5.2], patience=4) == [False] * 4 + [False]
    assert _feed(state, [5.1], patience=4) == [True]
    assert state.stint_improved() and state.best_val_params == {"score": 5.7}


@pytest.mark.parametrize("keys", [(), ("stint_mark",),
                                  ("stint_best", "stale_iterations", "stint_mark")])
def test_round_trip_and_checkpoints_without_the_stint_keys(keys):
    """as_dict/from_dict keep every field; a checkpoint saved before the stint fields
    (or before min_delta's mark) existed resumes with the whole restart as one stint,
    patience counted against its best."""
    state = RunState(best_params=None)
    _feed(state, [5.0, 4.0, 4.5])
    saved = state.as_dict()
    for key in keys:
        del saved[key]
    back = RunState.from_dict(saved)
    assert back.stint_best == back.stint_mark == 5.0
    assert back.bad_iterations == 2 and back.stale_iterations == 2
    assert back.as_dict() == state.as_dict()


def test_a_checkpoint_right_after_a_repeated_search_resumes_the_same_stint():
    # search_again() clears stint_best; the state saved then must not resume with the
    # restart's best as the stint's (its first iteration would count as a bad one)
    state = RunState(best_params=None)
    _feed(state, [5.0, 4.0, 4.0, 4.0])
    state.search_again()
    back = RunState.from_dict(state.as_dict())
    assert back.stint_best is None and back.stint_mark is None
    assert back.as_dict() == state.as_dict()
    assert not back.stint_over(4)  # (raised on best − None before)
    assert _feed(back, [4.5], patience=4) == _feed(state, [4.5], patience=4) == [False]
    assert back.as_dict() == state.as_dict()


def test_kept_parameters_move_to_the_models_device():
    """A state read onto the CPU (load_checkpoint's default) holds its kept parameters there;
    a resumed fit on CUDA compared them with the model's in torch.equal, which refuses two
    devices (tests/test_cuda_selection.py runs that fit). params_to moves both sets, and
    leaves the generator state (a CPU generator's) where it is."""
    import torch

    params = {"loc": torch.zeros(2, 3), "logits": torch.zeros(2)}
    state = RunState(best_params=params, best_val_params=dict(params),
                     generator=torch.Generator().get_state())
    state.params_to(torch.device("meta"))
    for kept in (state.best_params, state.best_val_params):
        assert {v.device.type for v in kept.values()} == {"meta"}
    assert state.generator.device.type == "cpu"
    RunState().params_to(torch.device("meta"))  # (nothing kept yet)


def test_a_new_restart_forgets_the_best_validation_score_and_parameters():
    """Otherwise the next restart's iterations would have to beat the earlier restart's best
    validation score, and one that does not would return the earlier restart's parameters."""
    state = RunState()
    _feed(state, [3.0, 2.0, 1.0])
    assert state.best_val_log_likelihood == 3.0 and state.best_val_params == {"score": 3.0}
    state.start_restart()
    assert state.best_val_log_likelihood is None and state.best_val_params is None
    assert state.stint_best is None and state.stint_mark is None and state.bad_iterations == 0
    # the new restart's first score is its best, however low
    assert _feed(state, [0.5]) == [False]
    assert state.best_val_params == {"score": 0.5}


def test_a_stint_climbing_from_below_the_best_resumes_with_its_own_counters():
    """In a stint after a repeated search that climbs from below the best, stale_iterations
    (since the overall best) and bad_iterations (since the stint's mark) differ; saving one
    under the other's name resumed the stint with 0 stale iterations, so it ran on past its
    2·patience iterations."""
    state = RunState(best_params=None)
    _feed(state, [5.0, 4.0, 4.0, 4.0])
    state.search_again()
    _feed(state, [1.0, 2.0, 3.0, 4.0, 4.9])
    assert state.stale_iterations == 5 and state.bad_iterations == 0  # (not vacuous)
    back = RunState.from_dict(state.as_dict())
    assert back == state  # every field
    assert back.stint_over(3) == state.stint_over(3) is False
    assert back.stint_over(2) == state.stint_over(2) is True  # 5 ≥ 2·2 stale iterations
    # the next iteration ends both at 2·patience = 6 stale iterations
    assert _feed(back, [4.99]) == _feed(state, [4.99]) == [True]
