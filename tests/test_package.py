"Integration: the exported package imports and rejects bad input with clear messages."
import pytest, torch
from mulan_nb.diffusion import check_levels, levels_to_data


def test_check_levels_names_the_problem():
    x = torch.randint(0, 17, (4, 1, 8, 8))
    check_levels(x, 17, (1, 8, 8))
    with pytest.raises(ValueError, match="dtype"): check_levels(x.float(), 17, (1, 8, 8))
    with pytest.raises(ValueError, match="shape"): check_levels(x, 17, (1, 28, 28))
    with pytest.raises(ValueError, match=r"\[0, 17\)"): check_levels(x + 17, 17, (1, 8, 8))


def test_levels_cover_minus_one_to_one():
    f = levels_to_data(torch.arange(256), 256)
    assert f.min() > -1 and f.max() < 1
    assert torch.allclose(f[1:] - f[:-1], torch.full((255,), 2 / 256))
