"""Transforms of a linear layer's input, applied by one forward pre-hook in a fixed order.

A layer can carry up to two stateless children that change what it multiplies:
``input_rotation`` (the online Hadamard of a rotated model, `pvq.rotation`) and then
``input_quantizer`` (simulated activation quantization, `pvq.activations`). They
are children of the layer itself, an `nn.Linear` or a `pvq.runtime.QuantizedLinear`
alike, so no class of the model is changed and the model's `state_dict` is unchanged
(the transforms are rebuilt from their JSON records, never stored as tensors).
"""

from __future__ import annotations

from torch import nn

__all__ = ["INPUT_TRANSFORMS", "attach_input_transform", "detach_input_transform", "input_transforms_of"]

#: Child names, in the order they are applied to the input.
INPUT_TRANSFORMS = ("input_rotation", "input_quantizer")
_HOOK_ATTRIBUTE = "_pvq_input_hook"


def _apply(module: nn.Module, args):
    if not args:
        return None
    x = args[0]
    for name in INPUT_TRANSFORMS:
        transform = module._modules.get(name)
        if transform is not None:
            x = transform(x)
    return (x, *args[1:])


def attach_input_transform(module: nn.Module, name: str, transform: nn.Module) -> None:
    """Make `transform` the layer's `name` transform (ValueError if it already has one)."""
    if name not in INPUT_TRANSFORMS:
        raise ValueError(f"unknown input transform {name!r}; known: {', '.join(INPUT_TRANSFORMS)}")
    if module._modules.get(name) is not None:
        raise ValueError(f"{type(module).__name__} already has an {name}")
    module.add_module(name, transform)
    if getattr(module, _HOOK_ATTRIBUTE, None) is None:
        setattr(module, _HOOK_ATTRIBUTE, module.register_forward_pre_hook(_apply))


def detach_input_transform(module: nn.Module, name: str) -> None:
    """Remove the layer's `name` transform (and the hook once no transform is left)."""
    module._modules.pop(name, None)
    if not any(module._modules.get(n) is not None for n in INPUT_TRANSFORMS):
        handle = getattr(module, _HOOK_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOK_ATTRIBUTE)


def input_transforms_of(module: nn.Module) -> dict[str, nn.Module]:
    """The layer's input transforms by name, in application order."""
    return {n: module._modules[n] for n in INPUT_TRANSFORMS if module._modules.get(n) is not None}
