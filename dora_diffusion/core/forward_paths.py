"""Which computation a forward call of an adapted layer runs: one ordered table, first match wins.

Every path computes the same thing. For the running adapters ``j`` (active, strength ``k_j != 0``), with
``(c_j, B'_j) = Adapter.scaled(k_j)``:

    y = W0 x + b + sum_j [ c_j * (W0 x) + B'_j A_j dropout(x) ]        (per-output DoRA and LoRA)

so the bias is never scaled and dropout touches only the low-rank path. They differ in what they keep for
the backward pass and in how many passes they make over the output:

    path                 when                                               keeps for backward
    base                 disabled, fused, or nothing running                the base module's own
    dense                a running adapter of a dense delta kind (LoHa,     the low-rank adapters' path's,
                         LoKr, Tucker, full): the low-rank ones take their  plus autograd's for k (W' - W0) x
                         own path, each dense one adds k (W' - W0) x, its
                         change of weight cached (``DenseAdapter.change``)
    lean_linear          training one per-output DoRA adapter at k = 1      y (or x, with recompute_output)
                         against a frozen base, on a Linear called
                         directly (no hooks)
    lean_scaled          the same on a Conv2d or a hooked Linear            y (or x, with recompute_output)
    inference            no gradient needed (adapters, input and base all   nothing (no autograd)
                         without requires_grad, or grad mode off),
                         per-output norms only
    lora_in_place        plain LoRA adapters on a Linear called directly    what LoRA needs, no N x d_out copy
    reference            anything else (legacy per-input norms, several     plain autograd
                         adapters in training, torch.compile unless the
                         layer's ``compile_lean`` is set)

``AdaptedLayer.forward_path(x)`` names the path a call would take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dora_diffusion.core.adapter import Adapter
from dora_diffusion.core.dora_autograd import DoRALinearFunction, DoRAScaleFunction
from dora_diffusion.core.geometry import Geometry
from dora_diffusion.core.norms import EPS


class AdaptedLayer(Protocol):
    """What the paths read of a layer (``layers.AdaptedLayer`` is the one implementation)."""

    base_layer: nn.Module
    geometry: Geometry
    adapters: Mapping[str, Adapter]
    disabled: bool
    fused: dict[str, float]
    lean_training: bool
    compile_lean: bool
    recompute_output: bool


@dataclass(frozen=True)
class Call:
    """One forward call, described once for the predicates: the input, dtypes, and the running adapters."""

    x: torch.Tensor
    base_in: torch.Tensor
    """``x`` in the weight dtype (or ``x`` itself under autocast, which casts by itself)."""
    out_dtype: torch.dtype
    running: tuple[tuple[Adapter, float], ...]
    """``(adapter, k)`` of the active adapters with ``k != 0``, in the order they were added."""
    autocast: bool
    grad: bool
    """Autograd must see this call: gradients may reach a running adapter's parameters, the input, or the base
    module's own parameters (a user's model that was not frozen)."""
    base_grad: bool
    """Gradients may reach the base module's own parameters: only the paths that call the base module or
    ``F.linear`` with its weight under autograd give them."""
    compiling: bool
    """Inside ``torch.compile``: inductor fuses the reference path; the lean functions run there only with
    ``compile_lean`` (they trace without a graph break; the norm is then computed in the graph, not cached)."""
    hooked: bool
    """The base module has hooks (e.g. accelerate offloading): it must be called, and its weight may not be
    where the hook put it by the time of the backward."""
    direct: bool
    """The base product may be done here (``F.linear``) instead of calling the base module."""

    @classmethod
    def of(cls, layer: AdaptedLayer, x: torch.Tensor) -> Call:
        geom = layer.geometry
        autocast = torch.is_autocast_enabled(x.device.type)
        running = tuple((a, a.strength) for a in layer.adapters.values() if a.strength)
        hooked = _has_hooks(layer.base_layer)
        grad_mode = torch.is_grad_enabled()
        bias, dtype = geom.bias, geom.dtype
        base_grad = grad_mode and (geom.weight_requires_grad or (bias is not None and bias.requires_grad))
        return cls(
            x=x,
            base_in=x if autocast or x.dtype == dtype else x.to(dtype),
            out_dtype=torch.get_autocast_dtype(x.device.type) if autocast else x.dtype,
            running=running,
            autocast=autocast,
            grad=grad_mode and (base_grad or x.requires_grad or any(a.trainable for a, _ in running)),
            base_grad=base_grad,
            compiling=torch.compiler.is_compiling(),
            hooked=hooked,
            direct=geom.direct and not hooked,
        )


@dataclass(frozen=True)
class ForwardPath:
    name: str
    applies: Callable[[AdaptedLayer, Call], bool]
    run: Callable[[AdaptedLayer, Call], torch.Tensor]


# ---------------------------------------------------------------------------------------------- predicates
def _nothing_to_add(layer: AdaptedLayer, call: Call) -> bool:
    return layer.disabled or bool(layer.fused) or len(call.running) == 0


def _has_dense(layer: AdaptedLayer, call: Call) -> bool:
    return any(a.spec.kind != "lowrank" for a, _ in call.running)


def _lean(layer: AdaptedLayer, call: Call) -> bool:
    """Training exactly one per-output DoRA adapter at strength 1 against a frozen base."""
    compiled_ok = not call.compiling or layer.compile_lean
    if not (layer.lean_training and call.grad and not call.base_grad and compiled_ok and len(call.running) == 1):
        return False
    adapter, k = call.running[0]
    return k == 1.0 and adapter.spec.use_dora and adapter.spec.norm_axis == "out"


def _lean_linear(layer: AdaptedLayer, call: Call) -> bool:
    return call.direct and _lean(layer, call)


def _no_autograd(layer: AdaptedLayer, call: Call) -> bool:
    return not call.grad and not call.compiling and all(a.spec.norm_axis == "out" for a, _ in call.running)


def _lora_linear(layer: AdaptedLayer, call: Call) -> bool:
    return call.direct and not any(a.spec.use_dora for a, _ in call.running)


def _always(layer: AdaptedLayer, call: Call) -> bool:
    return True


# ---------------------------------------------------------------------------------------------- paths
def _base(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    return layer.base_layer(call.base_in)


def _dense_run(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    """Low-rank adapters through the path they would take alone; each dense-kind adapter adds
    ``k (W' - W0) x`` (and ``k diff_b`` for a full diff), its change of weight materialised once per change of
    its tensors or W0 (``DenseAdapter.change``)."""
    low = replace(call, running=tuple((a, k) for a, k in call.running if a.spec.kind == "lowrank"))
    y = choose(layer, low).run(layer, low)
    geom = layer.geometry
    for adapter, k in call.running:
        if adapter.spec.kind == "lowrank":
            continue
        d = adapter.change(k)  # (d_out, in[, kh, kw]) fp32
        x = call.base_in
        y = y + geom.apply(x, d if call.autocast or d.dtype == x.dtype else d.to(x.dtype)).to(y.dtype)
        if adapter.bias_delta is not None:
            y = y + geom.channel(k * adapter.bias_delta).to(y.dtype)
    return y


def _lean_linear_run(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    """Lean DoRA step on a Linear (``DoRALinearFunction``): the base matmul, the low-rank term and the scale
    build ``y`` in place, and ``y`` (or ``x``) is all that is kept. When the norm is not cached yet and the
    step runs in fp32, ``A W0^T`` for the norm comes out of the forward matmul itself: ``A``'s rows are
    stacked under ``x``, so ``W0`` is read once."""
    ((adapter, _),) = call.running
    geom, x, base_in = layer.geometry, call.x, call.base_in
    xd, h = _low_rank_input(layer, call, adapter)
    w, w0x = geom.weight, []
    if call.compiling:  # the cache's key compares data pointers, which dynamo cannot trace: the norm is in the graph
        n = adapter.norm()
    else:
        key = adapter.norm_key()
        n = adapter.cached_norm(key)
    if n is None and not call.autocast and w.dtype == adapter.A.dtype == base_in.dtype == torch.float32:
        with torch.no_grad():
            x2 = base_in.reshape(-1, base_in.shape[-1])
            z = torch.cat([x2, adapter.A]) @ w.t()  # (N + r, d_out): W0 x and (W0 A^T)^T in one pass over W0
            w0x = [z[: x2.shape[0]]]  # handed over in a list: the function writes y into it, autograd never sees it
            n = adapter.remember_norm(key, adapter.compute_norm(w0_at=z[x2.shape[0] :].t()))
    elif n is None:
        n = adapter.remember_norm(key, adapter.compute_norm())
    g = adapter.magnitude.float() / n.clamp_min(EPS)
    # recompute only when the input we keep is the very tensor A's backward keeps: no extra memory.
    # (`base_in is x` already means x has the weight dtype; under autocast x must have the autocast dtype.)
    recompute = layer.recompute_output and xd is x and base_in is x
    if recompute and call.autocast:
        recompute = x.dtype == torch.get_autocast_dtype(x.device.type)
    return DoRALinearFunction.apply(base_in, h, w, geom.bias, adapter.B, g, adapter.spec.scale, recompute, w0x)


def _lean_scaled_run(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    """Lean DoRA step given the base module's output (``DoRAScaleFunction``): a Conv2d, or a Linear whose
    hooks must run. With ``recompute_output`` (an unhooked Conv2d only) it keeps ``x`` instead of ``y``."""
    ((adapter, _),) = call.running
    geom, x = layer.geometry, call.x
    xd, h = _low_rank_input(layer, call, adapter)
    base_out = layer.base_layer(call.base_in)
    is_conv = geom.kind == "Conv2d"
    recompute = layer.recompute_output and is_conv and not call.hooked and xd is x and call.base_in is x
    recompute = recompute and not call.autocast
    keep_x = (x, geom.base) if recompute else (None, None)
    return DoRAScaleFunction.apply(base_out, h, adapter.B, adapter.factor(), geom.bias, adapter.spec.scale, is_conv, *keep_x)


def _low_rank_input(layer: AdaptedLayer, call: Call, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x), A dropout(x))`` for a lean step; autograd keeps the first (or its autocast copy) for dL/dA.
    Under autocast the down product casts by itself: an upcast here would be kept as a second copy."""
    xd = adapter.dropout(call.x)
    if not call.autocast:
        xd = xd.to(adapter.A.dtype)
    return xd, layer.geometry.down(xd, adapter.A)  # h: (..., r)


@torch.no_grad()
def _inference(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    """No autograd, built in place on the base output:
    ``y = (W0 x + b) * (1 + c) - b c + sum_j B'_j h_j`` with ``c = sum_j c_j``."""
    geom, x = layer.geometry, call.x
    y = layer.base_layer(call.base_in)  # same op as the base module: bit-identical when c = 0 and B = 0
    coef = None
    terms = []
    for adapter, k in call.running:
        c, b_scaled = adapter.scaled(k)
        if c is not None:
            coef = c if coef is None else coef + c
        terms.append((geom.down(adapter.dropout(x).to(adapter.A.dtype), adapter.A), b_scaled))  # h: (..., r)
    if coef is not None:
        bias = geom.bias
        scale = geom.channel(1.0 + coef)
        if bias is None:
            y.mul_(scale)
        else:
            torch.addcmul(geom.channel(-(bias.float() * coef)), y, scale, out=y)
    for h, b_scaled in terms:
        geom.add_up(y, h.to(y.dtype), b_scaled.to(y.dtype))
    return y


def _lora_in_place(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    """Plain LoRA with autograd on a Linear, each ``B' h`` added in place into a 2-D base output (autograd-safe:
    the base matmul does not need its output for backward). 2-D because ``F.linear`` of a 3-D input with bias
    returns a view, and autograd undoes an in-place op on a view with two full copies of the output gradient."""
    geom, x, base_in = layer.geometry, call.x, call.base_in
    y = F.linear(base_in.reshape(-1, base_in.shape[-1]), geom.weight, geom.bias)  # (N, d_out)
    for adapter, k in call.running:
        _, b_scaled = adapter.scaled(k)
        h = geom.down(adapter.dropout(x).to(adapter.A.dtype), adapter.A)
        geom.add_up(y, h.to(y.dtype), b_scaled.to(y.dtype))
    return y.view(*base_in.shape[:-1], y.shape[-1])


def _reference(layer: AdaptedLayer, call: Call) -> torch.Tensor:
    """Any mix of adapters, plain autograd, out of place. Legacy per-input DoRA scales the input columns:
    ``k [(W0 + s B A) (g * x) - W0 x]``."""
    geom, x = layer.geometry, call.x
    base_out = layer.base_layer(call.base_in)
    result = base_out
    coef = None  # sum_j c_j, per output channel
    for adapter, k in call.running:
        a, spec = adapter.A, adapter.spec
        xd = adapter.dropout(x).to(a.dtype)
        if spec.norm_axis == "in":
            cin = geom.input_channel(adapter.factor())  # per input channel
            term = geom.up(geom.down(xd * cin, a), (k * spec.scale) * adapter.B)
            shifted = (x.to(a.dtype) * (cin - 1.0)).to(geom.dtype)
            term = term + k * geom.base(shifted).to(term.dtype)
        else:
            c, b_scaled = adapter.scaled(k)
            if c is not None:
                coef = c if coef is None else coef + c
            term = geom.up(geom.down(xd, a), b_scaled)
        result = result + term
    if coef is not None:
        scaled = base_out * geom.channel(coef)
        if geom.bias is not None:
            scaled = scaled - geom.channel(coef * geom.bias.float())
        result = result + scaled
    return result


FORWARD_PATHS: tuple[ForwardPath, ...] = (
    ForwardPath("base", _nothing_to_add, _base),
    ForwardPath("dense", _has_dense, _dense_run),
    ForwardPath("lean_linear", _lean_linear, _lean_linear_run),
    ForwardPath("lean_scaled", _lean, _lean_scaled_run),
    ForwardPath("inference", _no_autograd, _inference),
    ForwardPath("lora_in_place", _lora_linear, _lora_in_place),
    ForwardPath("reference", _always, _reference),
)
"""Read top to bottom; the first path whose predicate holds runs."""


def choose(layer: AdaptedLayer, call: Call) -> ForwardPath:
    """The path ``call`` takes through ``layer``."""
    return next(p for p in FORWARD_PATHS if p.applies(layer, call))


def _has_hooks(module: nn.Module) -> bool:
    """Modules with hooks (e.g. accelerate offloading) must be called, not bypassed with F.linear."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))
