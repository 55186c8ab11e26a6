"""How the losses take their options bundles (:class:`~fastalign.ops._policy_math.PolicyLossOptions`,
:class:`~fastalign.ops._dpo_math.DPOLossOptions`), and the deprecated keyword names they still accept.

A loss takes its options either as one frozen dataclass (``options=``) or as that dataclass's fields, spelled as
keywords; the fields appear in the function's signature (``help()``, ``inspect.signature``) without being
written out again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch.nn

Options = TypeVar("Options")
Function = TypeVar("Function", bound=Callable)
# A module's forward is called through torch.nn.Module.__call__: its warnings point past these frames.
_TORCH_NN_MODULES = os.path.dirname(torch.nn.modules.module.__file__)


def options_from(kind: type[Options], options: Options | None, fields: dict[str, Any], owner: str) -> Options:
    """The options bundle of a call: ``options`` itself, or ``kind(**fields)`` (each field checked there)."""
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return kind(**fields)
    if not isinstance(options, kind):
        raise TypeError(f"{owner}(options=...) must be a {kind.__name__}, got {type(options).__name__}")
    if fields:
        raise TypeError(f"{owner}() takes options= or the option keywords {sorted(fields)}, not both")
    return options


def with_option_fields(kind: type) -> Callable[[Function], Function]:
    """Show the fields of the dataclass ``kind`` in the decorated function's signature, as keyword-only
    parameters in place of its ``**fields``."""

    def decorate(function: Function) -> Function:
        signature = inspect.signature(function)
        parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters += [
            inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=field.type)
            for field in dataclasses.fields(kind)
        ]
        function.__signature__ = signature.replace(parameters=parameters)
        return function

    return decorate


def renamed_keywords(**new_names: str) -> Callable[[Function], Function]:
    """Accept each old keyword (``old="new"``) in place of its new name for one release, with a
    ``DeprecationWarning``; passing both is a ``TypeError``."""

    def decorate(function: Function) -> Function:
        owner = function.__qualname__.removesuffix(".forward")

        @functools.wraps(function)
        def accepting_old_names(*args, **kwargs):
            for old, new in new_names.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{owner}() got {old}= (the deprecated name of {new}=) and {new}=")
                    level, frame = 2, sys._getframe(1)
                    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_NN_MODULES):
                        level, frame = level + 1, frame.f_back
                    warnings.warn(
                        f"{owner}({old}=...) is deprecated: the keyword is now {new}= (the old name goes in the "
                        "next release)",
                        DeprecationWarning,
                        stacklevel=level,
                    )
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return accepting_old_names

    return decorate
