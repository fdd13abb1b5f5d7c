"""The NAME=VALUE hyperparameter arguments every bench tool takes after `--`, checked the one way: a name that is
not one of train_gpt.py's hyperparameters is an error, never a setting silently ignored."""
from __future__ import annotations

from collections.abc import Collection, Iterable


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
