"""What the bench tools share about running train_gpt.py: the NAME=VALUE hyperparameter arguments they take after
`--`, checked the one way (a name train_gpt.py does not take is an error, never a setting silently ignored), and
the process-wide state its main() sets, put back for tools and tests that run it in their own process."""
from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator
from types import ModuleType


class SettingError(ValueError):
    """An argument that is not NAME=VALUE with NAME one of train_gpt.py's hyperparameters."""


def hparam_settings(items: Iterable[str], names: Collection[str]) -> dict[str, str]:
    """The arguments as an environment, in order (a later NAME wins); SettingError names the first bad one."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise SettingError(f"{item!r}: expected NAME=VALUE, NAME one of train_gpt.py's hyperparameters")
        env[name] = value
    return env


@contextlib.contextmanager
def process_state_kept(tg: ModuleType) -> Iterator[None]:
    """train_gpt's activation dtype and attention backend, and torch's thread count, as they were on entry, put back
    on exit: main() sets all three for the whole process."""
    saved = tg.ACT_DTYPE, tg.ATTENTION, tg.torch.get_num_threads()
    try:
        yield
    finally:
        tg.ACT_DTYPE, tg.ATTENTION = saved[:2]
        tg.torch.set_num_threads(saved[2])
