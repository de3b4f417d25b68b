"""The progressive-growing schedule methods read: resolution doubles, α fades in linearly."""

import pytest

from core.schedule import growth_at


@pytest.mark.parametrize("start,target", [(8, 32), (16, 512), (4, 4)])
def test_growth_doubles_to_the_target_with_linear_fade_in(start, target):
    stable, fade = 100, 50
    seen = list(range(0, 4000, 5))
    states = [growth_at(n, start, target, stable, fade) for n in seen]
    resolutions = [r for r, _, _ in states]
    assert resolutions[0] == start and resolutions[-1] == target
    assert all(b in (a, 2 * a) for a, b in zip(resolutions, resolutions[1:]))  # never skips a doubling
    assert all(0.0 <= alpha <= 1.0 for _, alpha, _ in states)
    for n, (resolution, alpha, stage) in zip(seen, states):
        assert resolution == start * 2 ** stage
        if stage == 0:
            assert alpha == 1.0 and (n < stable or start == target)
        else:
            into = n - stable - (stage - 1) * (stable + fade)  # images since this doubling
            assert alpha == pytest.approx(min(into / fade, 1.0))


def test_alpha_is_zero_right_after_a_doubling_and_one_after_the_fade():
    assert growth_at(99, 8, 16, 100, 40) == (8, 1.0, 0)
    assert growth_at(100, 8, 16, 100, 40) == (16, 0.0, 1)
    assert growth_at(120, 8, 16, 100, 40) == (16, 0.5, 1)
    assert growth_at(10**9, 8, 16, 100, 40) == (16, 1.0, 1)
