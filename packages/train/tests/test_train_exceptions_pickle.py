"""Every exception class of the project survives pickling (errors cross process boundaries:
data workers, process pools, DDP ranks). Classes are discovered, so new ones are covered."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

PACKAGES = ("post3r_kernels", "post3r_backbone", "post3r_slots", "post3r_data", "post3r_train")


def project_exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        modules = [package] + [
            importlib.import_module(info.name)
            for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")
            if not info.name.endswith("__main__")
        ]
        for module in modules:
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__.startswith("post3r_"):
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[name] for name in sorted(found)]


def make(cls: type[BaseException]) -> BaseException:
    """An instance built through the class's own constructor, one text value per argument."""
    if cls.__init__ is BaseException.__init__ or cls.__init__ in (
        base.__init__ for base in cls.__mro__ if base.__module__ == "builtins"
    ):
        return cls(f"{cls.__name__}: something names the thing and the fix")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    args = [
        f"<{p.name}>"
        for p in params
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    return cls(*args)


CLASSES = project_exception_classes()


def test_discovery_finds_the_known_classes() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"BadVideoError", "CheckpointError", "ConfigError", "RunDirLockedError"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_exception_survives_pickling(cls: type[BaseException]) -> None:
    error = make(cls)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)
