"""The error every bad setting raises, and the field check the config dataclasses use
(``dcgan/config/sections.py`` and the sections that live beside their owners, e.g. ``ModelConfig``
in ``dcgan/models/networks.py``)."""


class ConfigError(ValueError):
    """A bad key or value; the message names the key (and the file, once known)."""


class FieldError(ConfigError):
    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def check_field(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise FieldError(key, problem)
