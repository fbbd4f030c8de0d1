"""The zoo's training loop: it learns (loss goes down), is deterministic, and configs validate."""

from pathlib import Path

import pytest

from vitlens.errors import UserError
from vitlens.models.training import TrainConfig, load_train_config, train

JOBS = Path(__file__).resolve().parents[1] / "jobs" / "zoo"


def small(**changes) -> TrainConfig:
    base = dict(name="t", role="B/32", image_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                train_per_class=8, test_per_class=2, steps=40, batch_size=32, warmup_steps=5, lr=3e-3)
    return TrainConfig(**{**base, **changes})


def test_training_lowers_the_loss() -> None:
    result = train(small(), progress=False)
    first, last = result.losses[:5], result.losses[-5:]
    assert len(result.losses) == 40
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)
    assert 0.0 <= result.accuracy <= 1.0


def test_training_is_deterministic_per_seed() -> None:
    a = train(small(steps=4), progress=False).losses
    b = train(small(steps=4), progress=False).losses
    c = train(small(steps=4, seed=1), progress=False).losses
    assert a == b
    assert a != c


def test_every_zoo_config_loads() -> None:
    configs = sorted(JOBS.glob("*.toml"))
    assert len(configs) >= 4
    roles = {load_train_config(p).role for p in configs}
    assert {"B/32", "B/16", "L/16", "GAP"} <= roles


@pytest.mark.parametrize("text, fragment", [
    ('role = "B/32"\n', "'name'"),
    ('name = "x"\nrole = "B/32"\ncolour = 1\n', "colour"),
    ('name = "x"\nrole = "B/32"\nsteps = "many"\n', "steps"),
    ('name = "x"\nrole = "B/32"\nglobal_pool = "max"\n', "global_pool"),
])
def test_bad_configs_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment):
        load_train_config(path)
