"""diffusers: `fastema.diffusers.EMAModel`, a drop-in for `diffusers.training_utils.EMAModel`.

    from fastema.diffusers import EMAModel  # instead of: from diffusers.training_utils import EMAModel

The same constructor, methods and attributes, the same decay schedule (`get_decay`, operation for
operation), the same `state_dict()` and `save_pretrained` folder, in both directions; the update
is `fastema.ModelEMA`'s: one fused step per device and dtype that allocates nothing, a float32 EMA
of a bfloat16/float16 model after `ema.to(dtype=torch.float32)`, and an EMA kept in host memory
after `ema.to("cpu")` (updated in a background thread) that `copy_to`, `store`/`restore` and
`save_pretrained` read as usual. Importing `fastema` does not import diffusers; this module does.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import warnings
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from ._extras import missing_extra

try:
    import diffusers  # noqa: F401  - the models `save_pretrained`/`from_pretrained` write and read are its
except ModuleNotFoundError as error:
    raise missing_extra(error, "diffusers", "fastema.diffusers") from error

from .core.model_ema import ModelEMA

# Not in `fastema.__all__`: the engine's own rule for the module inside DDP and torch.compile wrappers, whose
# parameter names are the ones the engine tracks.
from .core.parallel import unwrap_model
from .core.state import STATE_FORMAT

__all__ = ["EMAModel"]

# What diffusers' `EMAModel.state_dict()` holds besides `shadow_params`, in its order; `save_pretrained`
# writes them into the model's config.json.
SETTINGS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
_DEPRECATED = {"max_value": "decay", "min_value": "min_decay", "device": "to(device=...)"}


class EMAModel:
    """An EMA of model parameters with the interface of diffusers' `EMAModel`, on `fastema.ModelEMA`.

    `step(parameters)` after each optimizer step: parameters that require grad move toward the
    model with `get_decay(optimization_step)`, the others are copied (as in diffusers). With
    `use_ema_warmup` the decay is `1 - (1 + t / inv_gamma) ** -power`, else `(1 + t) / (10 + t)`,
    `t` counting the steps after `update_after_step`, clamped to `[min_decay, decay]`.

    `parameters` is an iterable of parameters (what diffusers' scripts pass; `step` may then get
    another model's parameters of the same shapes, e.g. the EMA built from a copy of the model)
    or a module (its `ModelEMA` is built on it: `ema.engine.module` is an averaged copy of the
    model; `step` must get that module's parameters; as in diffusers, a module turns
    `use_ema_warmup` on). `foreach` is accepted for compatibility: the engine's fused step needs no
    temporary, so it is used either way where it can (`True` insists on it). The deprecated
    `max_value`, `min_value` and `device` keyword arguments work as in diffusers.

    Differences: until `to()` places it, the EMA follows the model to its device; `to()` keeps it
    where it puts it, in that dtype, for good (the engine is rebuilt, one copy of the EMA). The
    update is `lerp_`, which rounds a little differently from diffusers' `sub_`: they agree to
    about a float32 ulp per step, and a decay of 0 (the steps up to `update_after_step`) copies
    exactly here (`copy_`, also inf and nan). `ema.engine` is the `ModelEMA` of the parameters
    that require grad; a copy is its `reset()`, which restarts its counts.
    """

    def __init__(
        self,
        parameters: Iterable[Tensor] | nn.Module,  # the parameters to average, or a module
        decay: float = 0.9999,  # the largest decay, reached after the warm-up
        min_decay: float = 0.0,  # the smallest decay after `update_after_step`
        update_after_step: int = 0,  # optimizer steps during which the EMA copies the model
        use_ema_warmup: bool = False,  # `1 - (1 + t / inv_gamma) ** -power` instead of `(1 + t) / (10 + t)`
        inv_gamma: float = 1.0,  # the warm-up's time scale
        power: float = 2 / 3,  # the warm-up's exponent: 2/3 for ~1M steps, 3/4 for shorter runs
        foreach: bool | None = False,  # accepted for compatibility: the fused step is used where it can be
        model_cls: Any | None = None,  # the diffusers model class `save_pretrained` builds
        model_config: Mapping[str, Any] | None = None,  # its config
        **kwargs: Any,  # diffusers' deprecated max_value, min_value, device
    ) -> None:
        unknown = sorted(set(kwargs) - set(_DEPRECATED))
        if unknown:
            raise TypeError(f"EMAModel() got unexpected keyword arguments {unknown}")
        for name, replacement in _DEPRECATED.items():
            if kwargs.get(name) is not None:
                warnings.warn(
                    f"EMAModel({name}=...) is deprecated in diffusers; use {replacement} instead",
                    FutureWarning,
                    stacklevel=2,
                )
        if kwargs.get("max_value") is not None:
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            min_decay = kwargs["min_value"]
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r}; expected None, True or False")
        module = unwrap_model(parameters) if isinstance(parameters, nn.Module) else None
        named: dict[str, Tensor]
        if module is not None:
            use_ema_warmup = True  # what diffusers does for a module, for backward compatibility
            named = dict(module.named_parameters())
        else:
            named = {str(index): tensor for index, tensor in enumerate(_tensor_list(parameters, "parameters"))}
        if not named:
            raise ValueError("Invalid parameters: empty; expected the model's parameters")
        settings = _checked_settings(
            dict(
                decay=decay,
                min_decay=min_decay,
                optimization_step=0,
                update_after_step=update_after_step,
                use_ema_warmup=use_ema_warmup,
                inv_gamma=inv_gamma,
                power=power,
            ),
            "{}",
        )
        self.decay = settings["decay"]
        self.min_decay = settings["min_decay"]
        self.update_after_step = settings["update_after_step"]
        self.use_ema_warmup = settings["use_ema_warmup"]
        self.inv_gamma = settings["inv_gamma"]
        self.power = settings["power"]
        self.optimization_step = 0
        self.cur_decay_value: float | None = None  # set in `step()`
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config
        self.temp_stored_params: list[Tensor] | None = None
        self._engines = _Engines(named, module, self.decay, foreach)
        if kwargs.get("device") is not None:
            self.to(device=kwargs["device"])

    @property
    def engine(self) -> ModelEMA:
        """The `ModelEMA` of the parameters that require grad (of all of them while none does)."""
        return self._engines.parts[0].engine

    # ---- what training scripts call ------------------------------------------------------------------

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the update at `optimization_step` (1-based), computed exactly as diffusers does."""
        step = max(0, optimization_step - self.update_after_step - 1)

        if step <= 0:
            return 0.0

        if self.use_ema_warmup:
            cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur_decay_value = (1 + step) / (10 + step)

        cur_decay_value = min(cur_decay_value, self.decay)
        # make sure decay is not smaller than min_decay
        return max(cur_decay_value, self.min_decay)

    def step(self, parameters: Iterable[Tensor] | nn.Module) -> None:
        """Move the EMA toward `parameters` (the model's, after an optimizer step); frozen ones are copied."""
        engines = self._engines
        tensors, held = engines.read(parameters, "parameters")
        if not held:
            engines.follow(tensors)
        optimization_step = self.optimization_step + 1
        decay = self.get_decay(optimization_step)
        engines.update(tensors, decay)
        self.optimization_step = optimization_step
        self.cur_decay_value = decay

    @property
    def shadow_params(self) -> list[Tensor]:
        """The EMA's tensors, in the order of the parameters (references, as diffusers returns them)."""
        tensors = self._engines.ema_tensors()
        return [tensors[name].detach() for name in self._engines.names]

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[Tensor] | nn.Module) -> None:
        """Copy the EMA into `parameters` (any model's of the same shapes), converting device and dtype."""
        tensors, held = self._engines.read(parameters, "parameters")
        self._engines.copy_to(None if held else tensors)

    def store(self, parameters: Iterable[Tensor] | nn.Module) -> None:
        """Keep a copy of `parameters` in host memory, for `restore()` after an evaluation with the EMA."""
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        self.temp_stored_params = [
            tensor.detach().to("cpu", copy=True) for tensor in _tensor_list(parameters, "parameters")
        ]

    @torch.no_grad()
    def restore(self, parameters: Iterable[Tensor] | nn.Module) -> None:
        """Put the tensors `store()` kept back into `parameters`, wherever they live, and forget them."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        tensors = _tensor_list(parameters, "parameters")
        stored = self.temp_stored_params
        _check_shapes(tensors, [tuple(saved.shape) for saved in stored], "parameters", "the tensors store() kept")
        for part in self._engines.parts:
            part.engine.before_model_write()  # an offloaded update may still be copying the model
        for tensor, saved in zip(tensors, stored):
            tensor.copy_(saved)
        self.temp_stored_params = None

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> None:
        """Keep the EMA on `device` and its floating tensors in `dtype` from now on (None: unchanged).

        `to("cpu")` with a model on the GPU offloads the EMA: each step copies the model into host
        memory and updates there in a background thread. `to(dtype=torch.float32)` keeps a float32
        EMA of a bfloat16/float16 model. `non_blocking` is accepted for compatibility.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Invalid dtype: {dtype!r}; expected None or a floating torch.dtype")
        if device is not None and not isinstance(device, (str, torch.device, int)):
            raise TypeError(f"Invalid device: {device!r}; expected None, a device name or a torch.device")
        engines = self._engines
        engines.place(engines.device if device is None else torch.device(device), dtype or engines.dtype)

    def pin_memory(self) -> None:
        """Keep the EMA in host memory (`to("cpu")`); the engine pins the memory its copies go through."""
        self.to(device="cpu")

    # ---- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The settings and `shadow_params` (references), as diffusers' `EMAModel.state_dict()` has them."""
        state: dict[str, Any] = {key: getattr(self, key) for key in SETTINGS}
        state["shadow_params"] = self.shadow_params
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from a `state_dict()` of this class or of diffusers' `EMAModel`; checked before anything is set.

        Missing settings keep their values (as in diffusers), but a state with none of the keys is
        refused; `shadow_params`, if present, must match the parameters in number and shapes, be
        floating where the EMA is (converted to its dtypes) and hold data (not on the meta device).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Invalid state_dict: {type(state_dict).__name__}; expected a dict from state_dict()")
        # diffusers loads nothing from such a state, silently (a ModelEMA's shares only its "decay")
        if state_dict.get("format") == STATE_FORMAT or not any(
            key in state_dict for key in (*SETTINGS, "shadow_params")
        ):
            raise ValueError(
                f"Invalid state_dict: not an EMAModel state (expected some of {[*SETTINGS, 'shadow_params']}, got "
                f"{sorted(map(str, state_dict))[:8]}); a fastema.ModelEMA state loads with ema.engine.load_state_dict"
            )
        settings = _checked_settings(
            {key: state_dict.get(key, getattr(self, key)) for key in SETTINGS}, "state_dict[{!r}]"
        )
        shadow = state_dict.get("shadow_params")
        if shadow is not None:
            if not isinstance(shadow, (list, tuple)) or not all(isinstance(tensor, Tensor) for tensor in shadow):
                raise ValueError("Invalid state_dict['shadow_params']: expected a list of tensors")
            names = self._engines.names
            _check_shapes(
                list(shadow),
                self._engines.shapes,
                "state_dict['shadow_params']",
                "this EMA's (another architecture's?)",
            )
            ema_tensors = self._engines.ema_tensors()
            unloadable = [
                f"#{index}: {tensor.dtype} on {tensor.device}"
                for index, (name, tensor) in enumerate(zip(names, shadow))
                if not _loadable(tensor, ema_tensors[name])
            ]
            if unloadable:  # checked for every part before any is written
                raise ValueError(
                    f"Invalid state_dict['shadow_params']: expected dense tensors with data, floating where the EMA's "
                    f"are (it keeps its dtypes); got {unloadable[:5]}"
                )
            for part in self._engines.parts:
                part.load(dict(zip(names, shadow)))
        for key, value in settings.items():
            setattr(self, key, value)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the EMA as a `model_cls` model folder, the settings in its config.json (diffusers' format)."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_cls: Any, foreach: bool | None = False) -> EMAModel:
        """The EMA that `save_pretrained` (ours or diffusers') wrote to `path`; `model_cls` is its model class.

        Settings missing from its config.json keep their defaults, as in diffusers; a folder with none
        of them (a model's, not an EMA's) is refused.
        """
        config = model_cls.load_config(path)
        settings = {key: config[key] for key in SETTINGS if key in config}  # the others keep their defaults
        if not settings:  # diffusers would start from step 0 with the default settings
            raise ValueError(
                f"Invalid path: {os.fspath(path)!r} has no EMA settings {list(SETTINGS)} in its config.json; "
                "expected a folder written by EMAModel.save_pretrained"
            )
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(settings)
        return ema_model


class _Engines:
    """The parameters `step()` gets, split into the averaged and the copied ones, each part with its `ModelEMA`.

    The split follows `requires_grad` at every step, and the placement is `to()`'s (None: beside the
    model, in its dtype); a change of either builds new engines from the EMA's current values.
    """

    def __init__(
        self, named: Mapping[str, Tensor], module: nn.Module | None, decay: float, foreach: bool | None
    ) -> None:
        self.names = list(named)
        self.module = module
        # The tensors `step()` got last (the engines read them), by position; None until then where they are not
        # the module's: diffusers' scripts build the EMA from a copy of the model and let the copy go, so the
        # engines copy these tensors (as values) and keep no reference to them.
        self.held: list[Tensor] | None = None if module is None else list(named.values())
        self.plain: list[tuple[int, tuple]] = []  # (position, `_data_key`) of those that are not nn.Parameters
        self.shapes = [tuple(tensor.shape) for tensor in named.values()]
        self.flags = tuple(tensor.requires_grad for tensor in named.values())
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.options: dict[str, Any] = dict(decay=decay, foreach=True if foreach else None)
        self.parts = self._split(self.flags, None if module is not None else named)

    def _split(self, flags: tuple[bool, ...], values: Mapping[str, Tensor] | None) -> list[_Part]:
        """The averaged parameters (those requiring grad, or all if none does) and the copied ones, each
        with its engine, starting from `values` (None: the model's)."""
        averaged = [name for name, flag in zip(self.names, flags) if flag] or list(self.names)
        copied = [name for name in self.names if name not in set(averaged)]
        held = None if self.held is None else dict(zip(self.names, self.held))
        options = dict(self.options, device=self.device, ema_dtype=self.dtype)
        parts = [_Part(averaged, held, self.module, values, options)]
        if copied:  # frozen parameters are copied at every step, so an unfrozen one restarts from its last copy
            parts.append(_Part(copied, held, None, values, options))
        return parts

    def _rebuild(self, flags: tuple[bool, ...]) -> None:
        parts = self._split(flags, self.ema_tensors())  # the values wait for an update in flight
        for part in self.parts:
            part.engine.close()
        self.parts, self.flags = parts, flags

    def place(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Keep the EMA on `device`, its floating tensors in `dtype` (None: beside the model, in its dtype)."""
        placement = self.device, self.dtype
        if (device, dtype) == placement:
            return
        self.device, self.dtype = device, dtype
        try:
            self._rebuild(self.flags)
        except Exception:
            self.device, self.dtype = placement
            raise

    def ema_tensors(self) -> dict[str, Tensor]:
        """The EMA's tensors by name, as the engines' modules hold them."""
        tensors: dict[str, Tensor] = {}
        for part in self.parts:
            tensors.update(part.ema_tensors())
        return tensors

    def read(self, parameters: Iterable[Tensor] | nn.Module, argument: str) -> tuple[list[Tensor], bool]:
        """`parameters` as a list, checked against the EMA (as many tensors, of the same shapes), and
        whether they are the very tensors the engines read (checked when they came), with their data where it was."""
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        tensors = _tensor_list(parameters, argument, checked=False)
        if (
            self.held is not None
            and len(tensors) == len(self.held)
            and all(map(operator.is_, tensors, self.held))
            and all(_data_key(tensors[index]) == key for index, key in self.plain)
        ):
            return tensors, True
        tensors = _tensor_list(tensors, argument)
        _check_shapes(tensors, self.shapes, argument, "the parameters this EMA averages (another model's?)")
        return tensors, False

    def follow(self, tensors: list[Tensor]) -> None:
        """Make the engines read `tensors` (checked by `read`, not the ones they read): what `step()` got."""
        if self.module is not None and not all(map(operator.is_, tensors, self.module.parameters())):
            raise ValueError(
                "Invalid parameters: this EMAModel was built on a module and averages that module's "
                "parameters, not these; build it with EMAModel(model.parameters()) to step with another model's"
            )
        for part in self.parts:
            part.hold(dict(zip(self.names, tensors)))
        self.held = list(tensors)
        # The engines read a plain tensor through a parameter that shares its storage: a `tensor.data = ...`
        # since then is seen by comparing where its data is.
        self.plain = [
            (index, _data_key(tensor)) for index, tensor in enumerate(tensors) if not isinstance(tensor, nn.Parameter)
        ]

    def update(self, tensors: list[Tensor], decay: float) -> None:
        """Average the parameters that require grad with `decay` (all with 0 while none does); copy the rest."""
        flags = tuple(tensor.requires_grad for tensor in tensors)
        if flags != self.flags:
            self._rebuild(flags)
        averaged, *copied = self.parts
        # A copy is `reset()` (`copy_`), not an update with decay 0: `lerp_` with weight 1 computes
        # `model - (model - ema) * 0`, which is nan where either is infinite, and the EMA would stay nan.
        # While nothing requires grad everything is copied, as in diffusers.
        if decay == 0.0 or not any(flags):
            averaged.engine.reset()
        else:
            averaged.engine.update(decay=decay)
        for part in copied:
            part.engine.reset()

    def copy_to(self, tensors: list[Tensor] | None) -> None:
        """The EMA into `tensors`, by position (None: the tensors the engines read)."""
        named = None if tensors is None else dict(zip(self.names, tensors))
        for part in self.parts:
            part.copy_to(named)

    # A copy or a pickle holds the EMA's values and rebuilds the engines from them, as a `to()` does: not the
    # model's tensors that the engines read (the next `step()` gives them), nor an offloaded engine's thread.

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, values=self.ema_tensors())
        del state["parts"]
        state["held"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        values = state.pop("values")
        self.__dict__.update(state)
        self.parts = self._split(self.flags, values)


class _Part:
    """Some of the parameters, by name, and the `ModelEMA` that averages them.

    On the user's module when EMAModel was given one (for the averaged part); otherwise on a
    `_Tensors` container that holds the parameters `step()` gets.
    """

    def __init__(
        self,
        names: list[str],
        model_tensors: Mapping[str, Tensor] | None,  # the tensors to read (None: none until `hold`)
        module: nn.Module | None,
        values: Mapping[str, Tensor] | None,  # the EMA's values to start from (None: the model's)
        options: dict[str, Any],
    ) -> None:
        self.names = names
        self.container: _Tensors | None = None
        if module is not None:
            if values is not None and options["ema_dtype"] is None:
                options = dict(options, ema_dtype=_kept_dtype(module, names, values))
            self.engine = ModelEMA(module, tensor_names=names, **options)
            if values is not None:
                self.engine.copy_from(_Tensors({name: values[name] for name in names}))
            return
        if values is None:
            assert model_tensors is not None  # the values are the model's
            self.container = _Tensors({name: model_tensors[name] for name in names})
            self.engine = ModelEMA(self.container, tensor_names=names, **options)
            return
        # Built on stand-ins where the EMA goes, so that the one copy made is the EMA's, and no reference to the
        # values is kept; filled from them, then pointed at the model's tensors (followed at the engine's next use).
        stand_ins = [_stand_in(values[name], options["device"], options["ema_dtype"]) for name in names]
        self.container = _Tensors(dict(zip(names, stand_ins)))
        self.engine = ModelEMA(self.container, tensor_names=names, **options)
        self.load(values)
        if model_tensors is not None:
            self.hold(model_tensors)

    def hold(self, model_tensors: Mapping[str, Tensor]) -> None:
        """Read these model tensors from now on (a part on the user's module reads that module's)."""
        if self.container is not None:
            self.container.hold({name: model_tensors[name] for name in self.names})

    def ema_tensors(self) -> dict[str, Tensor]:
        module = self.engine.module  # waits for an update in flight
        tensors: dict[str, Tensor] = dict(module.named_parameters())
        tensors.update(module.named_buffers())
        return {name: tensors[name] for name in self.names}

    def copy_to(self, targets: Mapping[str, Tensor] | None) -> None:
        """The EMA into `targets` by name (None: the tensors the engine reads)."""
        if targets is None:
            self.engine.copy_to()
        else:
            self.engine.copy_to(_Tensors({name: targets[name] for name in self.names}))

    def load(self, values: Mapping[str, Tensor]) -> None:
        self.engine.copy_from(_Tensors({name: values[name] for name in self.names}))


class _Tensors(nn.Module):
    """Tensors under state-dict names (dotted names make submodules): what the engine reads or writes by name."""

    def __init__(self, named: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.hold(named)

    def hold(self, named: Mapping[str, Tensor]) -> None:
        """Hold these tensors, replacing what was held, all as parameters (a plain tensor in one sharing its
        storage), so that a name never changes kind between the model's side and the EMA's."""
        for name, tensor in named.items():
            path, _, key = name.rpartition(".")
            owner: nn.Module = self
            for part in path.split(".") if path else ():
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]  # type: ignore[assignment]  # added just above
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor.detach(), requires_grad=False)
            owner.register_parameter(key, tensor)


def _data_key(tensor: Tensor) -> tuple:
    """Where and how a tensor's data lies: it changes when `tensor.data = ...` gives it other data."""
    return tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape, tensor.stride()


def _stand_in(value: Tensor, device: torch.device | None, ema_dtype: torch.dtype | None) -> Tensor:
    """A tensor of `value`'s shape on one element of memory, where the EMA keeps it (None: where `value` is),
    for an engine to be built on: what it copies is the EMA, then filled from `value`."""
    dtype = ema_dtype if ema_dtype is not None and value.is_floating_point() else value.dtype
    if value.numel() <= 1:  # expanded, it would count as dense with strides 0, and the EMA would copy those
        return torch.zeros(value.shape, dtype=dtype, device=device or value.device)
    return torch.zeros((), dtype=dtype, device=device or value.device).expand(value.shape)


def _kept_dtype(module: nn.Module, names: list[str], values: Mapping[str, Tensor]) -> torch.dtype | None:
    """The `ema_dtype` under which an engine built on `module` keeps the EMA's `values` unrounded: None where
    each is in its parameter's dtype, else the widest of their floating dtypes (the model was cast since)."""
    parameters = dict(module.named_parameters())
    if all(values[name].dtype == parameters[name].dtype for name in names):
        return None
    floating = [values[name].dtype for name in names if values[name].is_floating_point()]
    return functools.reduce(torch.promote_types, floating) if floating else None


def _tensor_list(parameters: object, argument: str, checked: bool = True) -> list[Tensor]:
    """An iterable of tensors as a list (`checked`: distinct tensors), or an error naming `argument`."""
    if isinstance(parameters, Tensor) or not isinstance(parameters, Iterable):
        raise TypeError(f"Invalid {argument}: {type(parameters).__name__}; expected an iterable of parameters")
    tensors = list(parameters)
    if not checked:
        return tensors
    strays = [type(tensor).__name__ for tensor in tensors if not isinstance(tensor, Tensor)]
    if strays:
        raise TypeError(f"Invalid {argument}: expected tensors, got {strays[:3]}")
    if len({id(tensor) for tensor in tensors}) != len(tensors):
        raise ValueError(f"Invalid {argument}: a tensor appears twice")
    return tensors


def _loadable(saved: Tensor, ema_tensor: Tensor) -> bool:
    """Whether `saved` can be copied into `ema_tensor`: data to copy, floating into a floating one (never truncated)."""
    if saved.device.type == "meta" or saved.layout != torch.strided:
        return False
    return saved.is_floating_point() if ema_tensor.is_floating_point() else saved.dtype == ema_tensor.dtype


def _check_shapes(tensors: list[Tensor], shapes: list[tuple[int, ...]], argument: str, expected: str) -> None:
    """A ValueError naming `argument` unless `tensors` are as many as `shapes`, of those shapes."""
    mismatched = [
        f"#{index}: {tuple(tensor.shape)} != {shape}"
        for index, (tensor, shape) in enumerate(zip(tensors, shapes))
        if tuple(tensor.shape) != shape
    ]
    if len(tensors) != len(shapes) or mismatched:
        zero3 = any(hasattr(tensor, "ds_shape") for tensor in tensors)
        raise ValueError(
            f"Invalid {argument}: {len(tensors)} tensors, expected {len(shapes)} shaped like {expected}; shape "
            f"mismatches: {mismatched[:5]}"
            + ("; DeepSpeed ZeRO-3's partitioned parameters are not supported" if zero3 else "")
        )


def _checked_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """The EMA's settings, each checked (`where.format(key)` names a bad one); diffusers' types are all accepted."""
    for key in ("decay", "min_decay"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"Invalid {where.format(key)}: {value!r}; expected a float in [0, 1]")
    for key in ("optimization_step", "update_after_step"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"Invalid {where.format(key)}: {value!r}; expected an int >= 0")
        settings[key] = int(value)  # e.g. a numpy integer, which a config.json or a weights-only load refuses
    if not isinstance(settings["use_ema_warmup"], bool):
        raise ValueError(f"Invalid {where.format('use_ema_warmup')}: {settings['use_ema_warmup']!r}; expected a bool")
    for key in ("inv_gamma", "power"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or float(value) <= 0:
            raise ValueError(f"Invalid {where.format(key)}: {value!r}; expected a finite number > 0")
    return settings
