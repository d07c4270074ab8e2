"""Your own network: ``--model FILE.py:NAME`` or ``package.module:NAME``.

``NAME`` is an ``nn.Module`` subclass or a function returning one. fedge calls it with
the keyword arguments it declares among ``input_shape`` (one sample's shape, a tuple),
``num_classes`` and ``dropout``; any other argument needs a default. The network takes a
batch of raw samples and returns logits of shape ``(batch, num_classes)``. Only the
server (and a simulation) imports the file: devices get the model as a program
(:mod:`fedge.models.program`).
"""

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fedge.errors import FedgeError

ARGUMENTS = ("input_shape", "num_classes", "dropout")
Factory = Callable[..., nn.Module]


def with_file_path(model: str, path: Callable[[Path], Path]) -> str:
    """``model`` with ``path`` applied to its file, when it is ``FILE.py:NAME``; any
    other model as it is."""
    module, _, name = model.rpartition(":")
    return f"{path(Path(module))}:{name}" if module.endswith(".py") else model


def resolve_factory(model: str | Factory) -> tuple[str, Factory]:
    """Where the model comes from (as a user would write it) and what builds it."""
    if isinstance(model, nn.Module):
        raise FedgeError(f"the model is an instance of {type(model).__name__}; give the class "
                         "(or a function that returns one): fedge builds the model for the "
                         "data's input shape and classes")
    if callable(model):
        name = getattr(model, "__qualname__", type(model).__name__)  # e.g. a partial
        return f"{getattr(model, '__module__', None) or '?'}:{name}", model
    module_name, _, name = model.rpartition(":")
    if not module_name or not name:
        from fedge.models.registry import MODELS

        raise FedgeError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}, or "
                         "your own as FILE.py:NAME or package.module:NAME")
    module = (_import_file(Path(module_name)) if module_name.endswith(".py")
              else _import_module(module_name))
    factory = getattr(module, name, None)
    if factory is None:
        offered = sorted(n for n, v in vars(module).items()
                         if inspect.isclass(v) and issubclass(v, nn.Module)
                         and v.__module__ == module.__name__)
        raise FedgeError(f"{module_name} has no {name!r}; its nn.Module classes are: "
                         f"{', '.join(offered) or 'none'}")
    if not callable(factory) or isinstance(factory, nn.Module):
        raise FedgeError(f"{model} is a {type(factory).__name__}, not an nn.Module class or "
                         "a function that returns one")
    return model, factory


def _import_file(path: Path) -> object:
    if not path.is_file():
        raise FedgeError(f"model file {path} does not exist")
    resolved = path.resolve()
    # One module name per file: two files both called model.py must not collide.
    name = f"fedge_user_model_{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    # The file may import modules that sit next to it.
    sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # whatever the user's file raises while it is imported
        raise FedgeError(f"cannot import model file {path}: {_reason(error)}") from error
    finally:
        sys.path.remove(str(resolved.parent))
    sys.modules[name] = module
    return module


def _import_module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except Exception as error:  # ModuleNotFoundError, or the module's own failure
        raise FedgeError(f"cannot import model module {name}: {_reason(error)}") from error


def _reason(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    return f"{type(error).__name__}: {error}"


def _arguments(origin: str, factory: Factory) -> tuple[str, ...]:
    """The arguments among :data:`ARGUMENTS` that ``factory`` declares."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return ARGUMENTS
    required = [name for name, p in parameters.items()
                if name not in ARGUMENTS and p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL,)]
    if required:
        raise FedgeError(f"model {origin} needs argument {', '.join(required)}, which fedge "
                         f"cannot give: it passes only {', '.join(ARGUMENTS)} (give the "
                         "others defaults)")
    return tuple(name for name in ARGUMENTS if name in parameters)


def instantiate(origin: str, factory: Factory, input_shape: tuple[int, ...],
                num_classes: int, dropout: float) -> nn.Module:
    """A fresh network from ``factory``, checked to map a batch of samples to logits of
    shape ``(batch, num_classes)``."""
    given = {"input_shape": tuple(input_shape), "num_classes": num_classes,
             "dropout": dropout}
    arguments = {name: given[name] for name in _arguments(origin, factory)}
    try:
        model = factory(**arguments)
    except Exception as error:  # the user's constructor
        raise FedgeError(f"building model {origin} failed: {_reason(error)}") from error
    if not isinstance(model, nn.Module):
        raise FedgeError(f"model {origin} returned a {type(model).__name__}, not an "
                         "nn.Module")
    return model


def check_logits(origin: str, model: nn.Module, sample: torch.Tensor,
                 num_classes: int) -> None:
    """``model`` maps ``sample`` (a batch) to ``(batch, num_classes)`` logits."""
    model.eval()
    try:
        with torch.no_grad():
            logits = model(sample)
    except Exception as error:  # the user's forward
        raise FedgeError(f"model {origin} cannot take samples of shape "
                         f"{tuple(sample.shape[1:])}: {_reason(error)}") from error
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(sample),
                                                                      num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise FedgeError(f"model {origin} returns {shape} for a batch of {len(sample)}, but "
                         f"fedge needs logits of shape ({len(sample)}, {num_classes})")


def add_input_scaling(model: nn.Module, scaling: nn.Module) -> nn.Module:
    """``model`` with ``scaling`` applied to its input first. The scaling's constants
    are non-persistent buffers, so the model's state entries keep their names (those
    of ``--init``, ``--reset`` and ``--freeze``)."""
    model.add_module("fedge_input_scaling", scaling)
    model.register_forward_pre_hook(
        lambda module, args: (module.fedge_input_scaling(args[0]), *args[1:]))
    return model
