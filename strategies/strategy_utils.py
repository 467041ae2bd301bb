"""Small helpers around Flower strategies: seeded sampling, per-node configs, optimiser-state reset."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy

from strategies import records as R

#: Attributes of Flower's strategies that carry server-optimiser state (FedOpt family, FedAvgM).
OPTIMISER_STATE = ("m_t", "v_t", "momentum_vector", "current_arrays")


@contextlib.contextmanager
def seeded_random(rng: random.Random) -> Iterator[None]:
    """Run the block with the global ``random`` module drawing from ``rng`` (then restored).

    Flower's ``sample_nodes`` uses the global ``random.sample``; this makes the inner strategy's sampling
    repeatable without touching anybody else's random stream.
    """
    saved = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(saved)


def with_config(msg: Message, extra: Mapping[str, Any], key: str = R.CONFIG_KEY) -> Message:
    """Give ``msg`` its own copy of its RecordDict with ``extra`` added to its ConfigRecord.

    FedAvg shares one RecordDict between all messages of a round (flower.md §3), so copy before editing.
    """
    content = RecordDict(dict(msg.content.items()))
    configs = content.config_records
    name = key if key in configs or len(configs) != 1 else next(iter(configs))
    content[name] = ConfigRecord({**dict(configs.get(name, {})), **extra})
    msg.content = content
    return msg


def reset_optimiser_state(strategy: Strategy) -> list[str]:
    """Drop server-optimiser state (FedAdam/FedYogi moments, FedAvgM momentum) after unlearning.

    That state was built from updates that saw the forgotten data (flower.md §3). Wrappers are followed
    through their ``strategy`` attribute. Returns the attributes reset.
    """
    done, seen = [], set()
    current: Any = strategy
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for name in OPTIMISER_STATE:
            if getattr(current, name, None) is not None:
                setattr(current, name, None)
                done.append(f"{type(current).__name__}.{name}")
        current = getattr(current, "strategy", None)
    return done
