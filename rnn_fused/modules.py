"""Drop-in replacements for torch.nn.LSTM / GRU / RNN and LSTMCell / GRUCell / RNNCell.

Same constructors, parameter names, shapes, order and initialisation, same inputs
(batched, unbatched, batch_first, PackedSequence), outputs and errors as torch.nn; every
layer and direction runs through one rnn_fused operator call. The classes derive from
nn.Module, not nn.RNNBase, because TorchDynamo will not trace nn.RNNBase instances.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .ops import (
    GATES,
    Direction,
    both_directions,
    cell_step,
    rnn_layer,
    served_by_rnn_layer,
    zoneout_mask,
)

_PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
_CELL_NAMES = _PARAM_NAMES[:4]
# The floating dtypes that a float64 LSTM's c_0 may have besides its own (see forward).
_NARROWER_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# (layer, direction, bias, proj) -> _direction_names: a plain dict, which torch.compile
# reads as it is (it warns at every compile about a functools cache, whose wrapper it skips).
_DIRECTION_NAMES: dict[tuple[int, int, bool, bool], tuple[str, tuple[str | None, ...]]] = {}


def _direction_names(
    layer: int, direction: int, bias: bool, proj: bool
) -> tuple[str, tuple[str | None, ...]]:
    """The suffix of a layer and direction's parameters, and their names in _PARAM_NAMES's
    order (None for a parameter the layer has not: biases without bias, weight_hr without
    proj_size): made once (_DIRECTION_NAMES), not at every call."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    has = {"bias_ih": bias, "bias_hh": bias, "weight_hr": proj}
    names = tuple(base + suffix if has.get(base, True) else None for base in _PARAM_NAMES)
    _DIRECTION_NAMES[layer, direction, bias, proj] = suffix, names
    return suffix, names


def _weights(module: nn.Module, names: tuple[str | None, ...]) -> list[Tensor | None]:
    """The tensors a forward reads under these names (None for None): from _parameters,
    without nn.Module's __getattr__ call, unless torch.nn.utils moved one out
    (parametrizations such as weight_norm, prune, spectral_norm, or a plain tensor set in its
    place as weight-dropping wrappers do); then from the attribute that now holds it, as
    torch.nn reads it."""
    p = module._parameters
    return [None if n is None else p[n] if n in p else getattr(module, n) for n in names]


def _lstm_states(hx: object, op: str) -> list[Tensor]:
    """An LSTM's or LSTMCell's (h_0, c_0), refused in the words of torch.nn's operator `op`
    (lstm, lstm_cell) when it is not a tuple or list of two tensors: a tensor would iterate
    into its rows, a None become zeros."""
    if not isinstance(hx, (tuple, list)) or not all(isinstance(t, Tensor) for t in hx):
        got = type(hx).__name__
        if isinstance(hx, (tuple, list)):
            got += " of (" + ", ".join(type(t).__name__ for t in hx) + ")"
        raise TypeError(f"{op}(): argument 'hx' (position 2) must be tuple of Tensors, not {got}")
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states")
    return list(hx)


def _stacked(states: list[Tensor]) -> Tensor:
    """torch.stack of the layers' final states; one state as a view (a stack copies it)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def _check_type(value: object, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


def _scalar_name(dtype: torch.dtype) -> str:
    """torch.float64 -> 'Double', the name ATen's own messages use."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


# The hooks from_torch and to_torch copy (copies: the two modules stay apart; a handle made
# before removes the hook from the original only).
_HOOK_DICTS = (
    *(name for name in vars(nn.Module()) if name.endswith("_hooks") or "_hooks_" in name),
    "_is_full_backward_hook",
)


# Our modules' own attributes, which torch.nn's lack: not a user's, not handed over.
_OURS_ONLY = frozenset({"mode", "forget_bias", "dropconnect", "zoneout"})


def _hand_over(new: nn.Module, old: nn.Module, who: str) -> nn.Module:
    """Gives `new` the Parameter objects of `old` themselves (requires_grad, parameters tied
    to other modules, and optimisers made before all carry over), copies of its hooks, its
    training mode and the public attributes a user set on it."""
    for name in new._parameters:
        if name not in old._parameters:
            raise TypeError(
                f"{who}: {name} is not a parameter of the {type(old).__name__} (pruning, "
                "weight_norm or spectral_norm moves it out): convert before applying them, or "
                "remove them first"
            )
        setattr(new, name, old._parameters[name])
    for name in _HOOK_DICTS:
        hooks = getattr(old, name)
        setattr(new, name, hooks.copy() if isinstance(hooks, dict) else hooks)
    for name, value in vars(old).items():
        if not name.startswith("_") and name not in vars(new) and name not in _OURS_ONLY:
            setattr(new, name, value)
    return new.train(old.training)


class _Convertible:
    """from_torch / to_torch between a torch.nn recurrent module and ours."""

    _torch_class: type[nn.Module]

    def _init_kwargs(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_torch(cls, module: nn.Module):
        """The rnn_fused module equivalent to a torch.nn one, holding its Parameter objects
        and its hooks (_hand_over)."""
        if type(module) is not cls._torch_class:
            raise TypeError(
                f"{cls.__name__}.from_torch expects a {cls._torch_class.__name__}, got "
                f"{type(module).__name__}"
            )
        new = cls(**cls._init_kwargs(module), device="meta")
        return _hand_over(new, module, f"{cls.__name__}.from_torch")

    def to_torch(self) -> nn.Module:
        """The torch.nn module equivalent to this one, holding its Parameter objects and its
        hooks (_hand_over)."""
        new = self._torch_class(**self._init_kwargs(self), device="meta")
        return _hand_over(new, self, "to_torch")

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script's hook. TorchScript cannot compile our Python forward, so a
        scripted model holds torch.nn's equivalent in this module's place (its kernels, not
        ours), with this module's Parameter objects themselves: gradients and optimiser
        steps reach them as before. torch.jit.trace, torch.compile and torch.export record
        our operator instead."""
        try:
            return self.to_torch()
        except (TypeError, ValueError, RuntimeError) as e:
            raise RuntimeError(
                f"torch.jit.script cannot compile rnn_fused.{type(self).__name__}, nor put a "
                f"torch.nn equivalent in its place ({e}); use torch.jit.trace, torch.compile "
                "or torch.export, which record the fused operator"
            ) from e


def _permute(t: Tensor, order: Tensor | None) -> Tensor:
    """Reorders the batch (dim 1) of a stacked state."""
    return t if order is None else t.index_select(1, order)


class _Options:
    """The options torch.nn lacks, keyword-only on LSTM, GRU and their cells; their defaults
    give torch.nn's behaviour exactly.

    forget_bias: the initial bias of the gate that keeps the state (LSTM's forget gate,
        GRU's update gate): b_ih's block of that gate starts at forget_bias and b_hh's at
        0, so the gate starts at sigmoid(forget_bias) for a zero input and state. None:
        torch.nn's initialisation. reset_parameters applies it again.
    dropconnect: DropConnect on the recurrent weights W_hh: in training, each forward
        draws one mask per W_hh from torch's generator (as F.dropout: an element is kept
        with probability 1 - p and scaled by 1 / (1 - p)), used at every step; in eval the
        weights as they are, the expectation. A seed gives the same masks.
    zoneout: zoneout on the hidden state h (Krueger et al. 2016; on h only, as haste's
        layers): in training each unit of each row keeps its previous value with
        probability p at each step (masks seeded from torch's generator: ops.zoneout_mask),
        else takes the cell's new one; in eval h_t = p h_{t-1} + (1 - p) h~_t, the expectation.
        The output at each step is that h. Not with proj_size.
    """

    mode: str
    hidden_size: int
    forget_bias: float | None
    dropconnect: float
    zoneout: float

    def _set_options(
        self, forget_bias: float | None, dropconnect: float, bias: bool, zoneout: float = 0.0
    ) -> None:
        if forget_bias is not None:
            if self.mode not in ("LSTM", "GRU"):
                raise ValueError(f"forget_bias is for LSTM and GRU only, got mode {self.mode}")
            if not bias:
                raise ValueError("forget_bias needs bias=True, got bias=False")
            if not isinstance(forget_bias, numbers.Real) or isinstance(forget_bias, bool):
                raise TypeError(f"forget_bias must be a number, got {type(forget_bias).__name__}")
            forget_bias = float(forget_bias)
            if not math.isfinite(forget_bias):
                raise ValueError(f"forget_bias must be a finite number, got {forget_bias}")
        for name, value in (("dropconnect", dropconnect), ("zoneout", zoneout)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        self.forget_bias = forget_bias
        self.dropconnect = float(dropconnect)
        self.zoneout = float(zoneout)

    def _init_forget_bias(self, biases: list[tuple[Tensor, Tensor]]) -> None:
        if self.forget_bias is None:
            return
        keep = slice(self.hidden_size, 2 * self.hidden_size)  # the second gate block of both
        with torch.no_grad():
            for b_ih, b_hh in biases:
                b_ih[keep] = self.forget_bias
                b_hh[keep] = 0.0

    def _recurrent_weight(self, w_hh: Tensor) -> Tensor:
        if self.dropconnect > 0 and self.training:
            return F.dropout(w_hh, self.dropconnect, training=True)
        return w_hh

    def _zoneout_weights(self, like: Tensor, rows: tuple[int, ...]) -> Tensor | None:
        """The operator's zoneout argument for an output of shape (*rows, hidden_size): a
        mask (1: keep h_{t-1}) in training, the probability in eval; None without zoneout."""
        if not self.zoneout:
            return None
        shape = (*rows, self.hidden_size)
        if self.training:
            return zoneout_mask(shape, self.zoneout, like)
        return torch.full(shape, self.zoneout, dtype=like.dtype, device=like.device)

    # The LayerNorm cells (_LayerNormModule): the normalisations' parameters.
    _layer_norm = False

    def _layer_norm_shapes(self) -> list[tuple[str, int]]:
        """The LayerNorm cells' parameters of a layer and direction (without their suffix),
        in the operator's order: its layer_norm argument is their concatenation."""
        if not self._layer_norm:
            return []
        gate_size = GATES[self.mode] * self.hidden_size
        shapes = [("ln_weight_ih", gate_size), ("ln_weight_hh", gate_size)]
        if self.mode == "LSTM":
            shapes += [("ln_weight_cell", self.hidden_size), ("ln_bias_cell", self.hidden_size)]
        return shapes

    def _layer_norm_gains(self, suffix: str) -> Tensor | None:
        """The operator's layer_norm argument for a layer and direction, or None."""
        if not self._layer_norm:
            return None
        return torch.cat(_weights(self, tuple(b + suffix for b, _ in self._layer_norm_shapes())))

    def _options_repr(self) -> str:
        s = f", forget_bias={self.forget_bias}" if self.forget_bias is not None else ""
        s += f", dropconnect={self.dropconnect}" if self.dropconnect else ""
        return s + (f", zoneout={self.zoneout}" if self.zoneout else "")

    def to_torch(self) -> nn.Module:
        for name in ("dropconnect", "zoneout"):
            if getattr(self, name):
                raise ValueError(
                    f"to_torch: torch.nn has no {name}; set {name}=0 first (got "
                    f"{getattr(self, name)})"
                )
        return super().to_torch()


class _RNNBase(_Options, _Convertible, nn.Module):
    """Layers, directions, dropout and input forms around the per-layer operator."""

    # IndRNN: weight_hh is a vector u, the recurrence's element-wise weight.
    _elementwise = False

    @staticmethod
    def _init_kwargs(m) -> dict:
        kw = {
            k: getattr(m, k)
            for k in (
                "input_size",
                "hidden_size",
                "num_layers",
                "bias",
                "batch_first",
                "dropout",
                "bidirectional",
            )
        }
        if m.mode == "LSTM":
            kw["proj_size"] = m.proj_size
        if m.mode.startswith("RNN"):
            kw["nonlinearity"] = "tanh" if m.mode == "RNN_TANH" else "relu"
        return kw

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        forget_bias: float | None = None,
        dropconnect: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        super().__init__()
        self.mode = mode
        self._set_options(forget_bias, dropconnect, bias, zoneout)
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of "
                "an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        _check_type(bias, bool, "bias")
        _check_type(batch_first, bool, "batch_first")
        _check_type(input_size, int, "input_size")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        _check_type(hidden_size, int, "hidden_size")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and zoneout:
            raise ValueError(f"zoneout needs proj_size=0, got proj_size={proj_size}")
        if mode not in GATES:
            raise ValueError("Unrecognized RNN mode: " + mode)

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        gate_size = GATES[mode] * hidden_size
        out_size = proj_size or hidden_size
        directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                shapes = {
                    "weight_ih": (gate_size, layer_input),
                    "weight_hh": (hidden_size,) if self._elementwise else (gate_size, out_size),
                    "bias_ih": (gate_size,) if bias else None,
                    "bias_hh": (gate_size,) if bias else None,
                    "weight_hr": (proj_size, hidden_size) if proj_size else None,
                }
                # Named through the cache here, so that torch.compile's first trace finds it
                # filled (filling it there made the second call recompile).
                suffix, _ = _direction_names(layer, direction, bias, proj_size > 0)
                names = []
                for base in _PARAM_NAMES:
                    if shapes[base] is not None:
                        setattr(
                            self, base + suffix, nn.Parameter(torch.empty(shapes[base], **factory))
                        )
                        names.append(base + suffix)
                for base, size in self._layer_norm_shapes():
                    setattr(self, base + suffix, nn.Parameter(torch.empty(size, **factory)))
                    names.append(base + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)
        if self.bias:
            p = self._parameters
            self._init_forget_bias([(p[f"bias_ih{s}"], p[f"bias_hh{s}"]) for s in self._suffixes()])

    def _suffixes(self) -> list[str]:
        directions = ["", "_reverse"] if self.bidirectional else [""]
        return [f"_l{layer}{d}" for layer in range(self.num_layers) for d in directions]

    def flatten_parameters(self) -> None:
        """Kept for torch.nn compatibility: the operators take the parameters as they are."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s + self._options_repr()

    # --- checks, with torch.nn's exception types and messages ---------------------------
    # torch.nn.RNNBase's public helpers, for code that calls or overrides them; input as the
    # caller holds it (batch first where the module is), batch_sizes a packed input's.

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        weight_dtype = self._first_weight_dtype()
        if input.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), "
                f"or convert model: model.to({input.dtype})"
            )
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}"
            )

    def _state_shape(self, batch: int, size: int) -> tuple[int, int, int]:
        return (self.num_layers * (2 if self.bidirectional else 1), batch, size)

    def _batch_of(self, input: Tensor, batch_sizes: Tensor | None) -> int:
        if batch_sizes is not None:
            return batch_sizes[0].item()
        return input.size(0 if self.batch_first else 1)

    def get_expected_hidden_size(
        self, input: Tensor, batch_sizes: Tensor | None
    ) -> tuple[int, int, int]:
        return self._state_shape(
            self._batch_of(input, batch_sizes), self.proj_size or self.hidden_size
        )

    def get_expected_cell_size(
        self, input: Tensor, batch_sizes: Tensor | None
    ) -> tuple[int, int, int]:
        """The shape of an LSTM's cell state c_0."""
        return self._state_shape(self._batch_of(input, batch_sizes), self.hidden_size)

    def check_hidden_size(
        self,
        hx: Tensor,
        expected_hidden_size: tuple[int, int, int],
        msg: str = "Expected hidden size {}, got {}",
    ) -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Tensor | None) -> None:
        """input and the states (a tuple (h_0, c_0) for LSTM) against the module."""
        self.check_input(input, batch_sizes)
        expected = self.get_expected_hidden_size(input, batch_sizes)
        if self.mode != "LSTM":
            self.check_hidden_size(hidden, expected)
            return
        self.check_hidden_size(hidden[0], expected, "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(
            hidden[1],
            self.get_expected_cell_size(input, batch_sizes),
            "Expected hidden[1] size {}, got {}",
        )

    def permute_hidden(self, hx, permutation: Tensor | None):
        """The states' batch (dim 1) reordered by permutation (an LSTM's both states, given
        as a tuple or a list, come back as a tuple)."""
        if isinstance(hx, (tuple, list)):
            return tuple(_permute(t, permutation) for t in hx)
        return _permute(hx, permutation)

    # --- forward --------------------------------------------------------------------------

    def _zeros(self, input: Tensor, batch: int, size: int) -> Tensor:
        shape = self._state_shape(batch, size)
        return torch.zeros(shape, dtype=input.dtype, device=input.device)

    def forward(self, input, hx=None):
        if "parametrizations" in self._modules:
            self._read_parametrized_as_torch_nn()
        if (done := self._fast_forward(input, hx)) is not None:
            return done
        is_lstm = self.mode == "LSTM"
        out_size = self.proj_size or self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = batch_sizes[0].item()  # (int() would specialize it in non-strict export)
            is_batched = True
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            name = "LSTM" if is_lstm else ("GRU" if self.mode == "GRU" else "RNN")
            if data.dim() not in (2, 3):
                tail = "D instead" if name != "RNN" else "D tensor instead"
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {data.dim()}{tail}")
            is_batched = data.dim() == 3
            if not is_batched:
                data = data.unsqueeze(0 if self.batch_first else 1)
            if self.batch_first:
                data = data.transpose(0, 1)
            batch = data.size(1)
        hx = self._prepare_state(data, hx, batch, out_size, is_batched, packed, sorted_indices)
        self.check_input(data, batch_sizes)
        h0, c0 = hx if is_lstm else (hx, None)
        if h0 is not None:  # None: no states given, the operator starts from zeros
            if packed and torch.compiler.is_compiling():
                # A packed batch is data-dependent to torch.compile: asserted when the graph
                # runs, which lets the comparisons below be decided while tracing.
                torch._check(h0.size(1) == batch)
            # Compared here, check_hidden_size called only to raise: the common call pays no
            # method call per state.
            shape = self._state_shape(batch, out_size)
            if h0.size() != shape:
                if is_lstm:
                    self.check_hidden_size(h0, shape, "Expected hidden[0] size {}, got {}")
                self.check_hidden_size(h0, shape)
            if is_lstm and c0.size() != (shape[0], batch, self.hidden_size):
                shape = (shape[0], batch, self.hidden_size)
                self.check_hidden_size(c0, shape, "Expected hidden[1] size {}, got {}")
            if is_lstm and data.dtype == torch.float64 and c0.dtype in _NARROWER_FLOATS:
                # torch.nn's float64 LSTM promotes such a c_0 at its first step: the same
                # values as converting it first (exactly).
                c0 = c0.to(torch.float64)
        if not packed and data.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        if is_lstm and h0 is not None and self._float32_cell_state(data, h0, c0, packed):
            # torch.nn's bfloat16 LSTM on the CPU (oneDNN's, padded, without projection) takes a
            # float32 c_0 and returns a float32 c_n. The operator's call of bfloat16 parameters
            # on a float32 input keeps the cell state in float32 from c_0 and rounds what its
            # products read to bfloat16, as a bfloat16 call does; output and h_n are rounded.
            output, h_n, c_n = self._run_layers(data.float(), h0.float(), c0, batch_sizes)
            output, h_n = output.to(data.dtype), h_n.to(data.dtype)
        else:
            output, h_n, c_n = self._run_layers(data, h0, c0, batch_sizes)

        hidden = (h_n, c_n) if is_lstm else h_n
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, hidden

    def _float32_cell_state(self, data: Tensor, h0: Tensor, c0: Tensor, packed: bool) -> bool:
        """Whether a bfloat16 LSTM call with a float32 c_0 runs as torch.nn's on the CPU,
        which keeps it float32 (see forward); elsewhere torch.nn raises, and the operator
        names c_0."""
        bf16 = torch.bfloat16
        return (
            data.dtype == bf16
            and h0.dtype == bf16
            and c0.dtype == torch.float32
            and data.device.type == "cpu"
            and not packed
            and not self.proj_size
            and not torch._C._is_any_autocast_enabled()
        )

    def _first_weight_dtype(self) -> torch.dtype:
        """weight_ih_l0's dtype without evaluating a parametrization of it (torch.nn's check
        reads the weight its forward already has; see _read_parametrized_as_torch_nn)."""
        name = "weight_ih_l0"
        if name in self._parameters:
            return self._parameters[name].dtype
        if "parametrizations" in self._modules and name in self.parametrizations:
            originals = self.parametrizations[name]._parameters  # original, or original0, 1...
            return next(iter(originals.values())).dtype
        return getattr(self, name).dtype

    def _read_parametrized_as_torch_nn(self) -> None:
        """The extra reads of parametrized weights (torch.nn.utils.parametrize) that torch.nn's
        forward makes before the one it computes with (this forward's own): a parametrization
        with effects, such as spectral_norm's power iteration in training, then has them as
        often. torch.nn's forward reads every weight through hasattr and getattr while it
        looks for the first that changed (a parametrized one: a new tensor at every read, but
        for an identity), then all of them again that way: the first parametrized weight four
        times, the others twice."""
        first = True
        for name in self._flat_weights_names:
            if name in self.parametrizations:
                for _ in range(3 if first else 1):
                    getattr(self, name)
                first = False

    def _fast_forward(self, input: object, hx: object) -> tuple | None:
        """forward of the common call with no checks of its own: one layer in one direction,
        an input [T, B, I] ([B, T, I] batch_first) or unbatched [T, I] as a tensor, states
        None (zeros) or torch.nn's tensors ([1, B, H], unbatched [1, H]), no zoneout or
        LayerNorm, no DropConnect mask to draw. The operator checks every argument, and on a
        failure this returns None so that forward runs torch.nn's checks and raises
        torch.nn's error; None too for every other call, and under torch.compile, which
        traces forward."""
        if (
            self.num_layers != 1
            or self.bidirectional
            or self.zoneout
            or self._layer_norm
            or (self.dropconnect and self.training)
            or type(input) is not Tensor
            or input.dim() not in (2, 3)
            or torch.compiler.is_compiling()
        ):
            return None
        lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        h0 = c0 = None
        if hx is not None:
            if not lstm:
                h0 = hx
            elif type(hx) in (tuple, list) and len(hx) == 2:
                h0, c0 = hx
            else:
                return None
            if type(h0) is not Tensor or h0.dim() != input.dim():
                return None
            if lstm and (type(c0) is not Tensor or c0.dim() != input.dim()):
                return None
        if not batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        _, (w_ih, w_hh, b_ih, b_hh, w_hr) = self._direction_weights(0, 0)
        # The operator takes half-type parameters with a float32 input; torch.nn's layers
        # refuse them outside autocast (forward raises their error).
        if w_ih.dtype is not input.dtype and not torch._C._is_any_autocast_enabled():
            return None
        try:
            # Batched: states [1, B, H] in and out (the operator's [B, H] views made in C++;
            # another first size raises); an unbatched call's [1, H] is its batch of one's.
            output, h_n, c_n = rnn_layer(
                self.mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr=w_hr, stacked_states=batched
            )
        except (RuntimeError, TypeError):
            return None
        if not batched:
            output = output.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if lstm else h_n)

    def _prepare_state(self, data, hx, batch, out_size, is_batched, packed, sorted_indices):
        is_lstm = self.mode == "LSTM"
        if hx is None and not packed:
            # None: the operator starts from zeros (two tensors of zeros cost about 3 us, a
            # sixth of an LSTM's step at B=1 H=32). A packed call keeps them: without hx its
            # batch is a value that torch.compile's fake tensors lack (ops._layer_outputs).
            return (None, None) if is_lstm else None
        if hx is None:
            h0 = self._zeros(data, batch, out_size)
            return (h0, self._zeros(data, batch, self.hidden_size)) if is_lstm else h0
        if is_lstm and not (
            type(hx) is tuple
            and len(hx) == 2
            and isinstance(hx[0], Tensor)
            and isinstance(hx[1], Tensor)
        ):  # the common case checked inline: a call costs 0.4 us of a 18 us step
            hx = _lstm_states(hx, "lstm")
        if not packed:
            dims = [t.dim() for t in hx] if is_lstm else [hx.dim()]
            want = 3 if is_batched else 2
            if any(d != want for d in dims):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if is_lstm:
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {want}-D but got "
                        f"({dims[0]}-D, {dims[1]}-D) tensors"
                    )
                raise RuntimeError(
                    f"For {kind} input, hx should also be {want}-D but got {dims[0]}-D tensor"
                )
            if not is_batched:
                hx = tuple(t.unsqueeze(1) for t in hx) if is_lstm else hx.unsqueeze(1)
        return self.permute_hidden(hx, sorted_indices)

    def _run_layers(
        self, x: Tensor, h0: Tensor | None, c0: Tensor | None, batch_sizes: Tensor | None
    ):
        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            args = [self._direction(layer, d, x, h0, c0) for d in range(directions)]
            results = both_directions(self.mode, x, args, batch_sizes) if directions == 2 else None
            if results is None:
                results = []
                for d, a in enumerate(args):
                    done = rnn_layer(
                        self.mode, x, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.hx, a.cx,
                        w_hr=a.w_hr, batch_sizes=batch_sizes, reverse=d == 1,
                        zoneout=a.zoneout, layer_norm=a.layer_norm,
                    )  # fmt: skip
                    results.append(done)
            for _, h, c in results:
                h_n.append(h)
                c_n.append(c)
            x = results[0][0] if directions == 1 else torch.cat([r[0] for r in results], dim=-1)
        return x, _stacked(h_n), (_stacked(c_n) if self.mode == "LSTM" else None)

    def _direction(
        self, layer: int, direction: int, x: Tensor, h0: Tensor | None, c0: Tensor | None
    ) -> Direction:
        """The arguments of one layer and direction (states None: zeros)."""
        k = layer * (2 if self.bidirectional else 1) + direction
        suffix, (w_ih, w_hh, b_ih, b_hh, w_hr) = self._direction_weights(layer, direction)
        return Direction(
            w_ih,
            self._recurrent_weight(w_hh),
            b_ih,
            b_hh,
            None if h0 is None else h0[k],
            None if c0 is None else c0[k],
            w_hr,
            self._zoneout_weights(x, x.shape[:-1]),
            self._layer_norm_gains(suffix),
        )

    def _direction_weights(self, layer: int, direction: int):
        """The suffix of a layer and direction's parameters, and their tensors in
        _PARAM_NAMES's order (None for those the layer has not)."""
        key = (layer, direction, self.bias, self.proj_size > 0)
        suffix, names = _DIRECTION_NAMES.get(key) or _direction_names(*key)
        return suffix, _weights(self, names)


class RNN(_RNNBase):
    """Drop-in for torch.nn.RNN (tanh or relu)."""

    _torch_class = nn.RNN

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)


class GRU(_RNNBase):
    """Drop-in for torch.nn.GRU."""

    _torch_class = nn.GRU

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class LSTM(_RNNBase):
    """Drop-in for torch.nn.LSTM, with proj_size."""

    _torch_class = nn.LSTM

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)


class IndRNN(_RNNBase):
    """Independently recurrent network (Li et al. 2018), with torch.nn.RNN's constructor,
    inputs and outputs: h(t) = act(W_ih x(t) + b_ih + u * h(t-1) + b_hh), act tanh or relu,
    where the recurrent weight u (weight_hh_l{k}, shape [hidden_size]) multiplies each unit
    by its own previous value only. u starts uniform in [-1, 1] (|u| <= 1 keeps a unit's
    memory from growing), the rest as torch.nn.RNN's.

    It runs on the RNN operator with u as its w_hh: the CPU engine multiplies element-wise
    (H multiplies per row and step); the CUDA engine, for now, runs the product with
    diag(u), exact but [H, H] per step. Keyword-only: zoneout, as on the other layers."""

    _elementwise = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        zoneout: float = 0.0,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(
            mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, 0, device, dtype, zoneout=zoneout,
        )  # fmt: skip

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name in self._flat_weights_names:
            if name.startswith("weight_hh"):
                nn.init.uniform_(self._parameters[name], -1.0, 1.0)

    @classmethod
    def from_torch(cls, module: nn.Module):
        raise TypeError("IndRNN has no torch.nn counterpart to convert from")

    def to_torch(self) -> nn.Module:
        raise TypeError("IndRNN has no torch.nn counterpart to convert to")


class _LayerNormModule:
    """What the LayerNorm layers and cells add: their gains start at 1 and the cell state's
    bias at 0, and torch.nn has no counterpart to convert from or to."""

    _layer_norm = True

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.fill_(0.0 if name.startswith("ln_bias") else 1.0)

    @classmethod
    def from_torch(cls, module: nn.Module):
        raise TypeError(f"{cls.__name__} has no torch.nn counterpart to convert from")

    def to_torch(self) -> nn.Module:
        raise TypeError(f"{type(self).__name__} has no torch.nn counterpart to convert to")


class _LayerNormRNN(_LayerNormModule, _RNNBase):
    """LayerNormLSTM and LayerNormGRU: torch.nn.LSTM's (GRU's) constructor without
    proj_size, its inputs and outputs, and its parameters, plus per layer and direction
    ln_weight_ih_l{k} and ln_weight_hh_l{k} [gates * hidden_size], the gains of the layer
    normalisations of W_ih x and W_hh h (each over all gates; Ba, Kiros and Hinton 2016, as
    haste's LayerNorm cells), starting at 1. The biases are added after the normalisations.
    LayerNormLSTM also normalises its cell state before the tanh, h = o * tanh(LN(c)), with
    ln_weight_cell_l{k} (starting at 1) and ln_bias_cell_l{k} (at 0) [hidden_size]; the state
    it carries stays unnormalised. rnn_fused.reference.cell_step has the equations; the
    normalisations use the biased variance and eps 1e-5, as torch.nn.LayerNorm. The
    options forget_bias, dropconnect and zoneout apply as on LSTM and GRU.

    The normalisations are fused into each step on the CPU and CUDA engines."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        forget_bias: float | None = None,
        dropconnect: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        super().__init__(
            self._mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, 0, device, dtype, forget_bias=forget_bias, dropconnect=dropconnect,
            zoneout=zoneout,
        )  # fmt: skip

    _mode: str


class LayerNormLSTM(_LayerNormRNN):
    """LSTM with layer normalisation (see _LayerNormRNN)."""

    _mode = "LSTM"


class LayerNormGRU(_LayerNormRNN):
    """GRU with layer normalisation (see _LayerNormRNN)."""

    _mode = "GRU"


class _CellBase(_Options, _Convertible, nn.Module):
    """One step of a cell: the layer operator over a sequence of length 1."""

    @staticmethod
    def _init_kwargs(m) -> dict:
        kw = {"input_size": m.input_size, "hidden_size": m.hidden_size, "bias": m.bias}
        if hasattr(m, "nonlinearity"):
            kw["nonlinearity"] = m.nonlinearity
        return kw

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        bias: bool,
        device=None,
        dtype=None,
        forget_bias: float | None = None,
        dropconnect: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        super().__init__()
        self.mode = mode
        self._set_options(forget_bias, dropconnect, bias, zoneout)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        gate_size = GATES[mode] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((gate_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((gate_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        for base, size in self._layer_norm_shapes():
            setattr(self, base, nn.Parameter(torch.empty(size, **factory)))
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s + self._options_repr()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)
        if self.bias:
            self._init_forget_bias([(self.bias_ih, self.bias_hh)])

    def _check_step(self, input: Tensor, states: list[Tensor]) -> None:
        """torch.nn's cell checks, in its order and words; states are [B, H] each."""
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        for label, state in enumerate(states):
            if input.size(0) != state.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{label} batch size "
                    f"{state.size(0)}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{label} has inconsistent hidden_size: got {state.size(1)}, expected "
                    f"{self.hidden_size}"
                )
        if torch._C._is_any_autocast_enabled():
            return
        # An LSTMCell's c_0 only scales its gates: torch.nn promotes (see LSTMCell.forward).
        checked = states[:1] if self._steps_like_torch_nn() else states
        for t in (self.weight_ih, *checked):
            if t.dtype != input.dtype:
                raise RuntimeError(
                    "mat1 and mat2 must have the same dtype, but got "
                    f"{_scalar_name(input.dtype)} and {_scalar_name(t.dtype)}"
                )

    def _steps_like_torch_nn(self) -> bool:
        """Whether this is an LSTMCell of torch.nn's math (no zoneout, DropConnect or
        LayerNorm), which takes a c_0 of another dtype as torch.nn does."""
        return self.mode == "LSTM" and not (self.zoneout or self.dropconnect or self._layer_norm)

    def _step(self, input: Tensor, h: Tensor, c: Tensor | None):
        w_ih, w_hh, b_ih, b_hh = _weights(self, _CELL_NAMES)
        if (b_ih is None) != (b_hh is None):
            # One bias set to None by hand, which torch.nn's cells run without; the operator
            # takes both or neither: zeros for the missing one.
            b_ih = torch.zeros_like(b_hh) if b_ih is None else b_ih
            b_hh = torch.zeros_like(b_ih) if b_hh is None else b_hh
        _, h_n, c_n = rnn_layer(
            self.mode,
            input,
            w_ih,
            self._recurrent_weight(w_hh),
            b_ih,
            b_hh,
            h,
            c,
            zoneout=self._zoneout_weights(input, (input.size(0),)),
            layer_norm=self._layer_norm_gains(""),
            cell=True,
        )
        return h_n, c_n

    def _fast_step(self, input: Tensor, h: Tensor | None, c: Tensor | None):
        """One step of the common call (input [B, I] or [I]; states given, or None for
        zeros) with no checks of its own: the operator checks every argument, and on a
        failure this returns None so that the caller runs torch.nn's checks and raises
        torch.nn's error. None too where the short door does not serve (see ops.cell_step)
        or a weight is not in _parameters (_weights)."""
        if input.dim() not in (1, 2) or self.zoneout or self._layer_norm:
            return None
        drops = self.dropconnect and self.training
        if drops and served_by_rnn_layer():
            # _step draws the mask, once: a mask drawn here would be drawn again there, and a
            # seed would not repeat the eager run.
            return None
        p = self._parameters  # not self.weight_ih: nn.Module's __getattr__ costs a call
        try:
            w_ih, w_hh = p["weight_ih"], p["weight_hh"]
            if drops:
                w_hh = self._recurrent_weight(w_hh)
            return cell_step(self.mode, input, h, c, w_ih, w_hh, p["bias_ih"], p["bias_hh"])
        except (RuntimeError, TypeError, KeyError):  # KeyError: a weight moved out (_weights)
            return None

    def _forward_hidden_only(self, name: str, input: Tensor, hx: Tensor | None) -> Tensor:
        """forward of the cells whose only state is h (GRUCell, RNNCell)."""
        if (done := self._fast_step(input, hx, None)) is not None:
            return done[0]
        input, (h,), is_batched = self._inputs(name, input, [hx], ["hidden"])
        h, _ = self._step(input, h, None)
        return h if is_batched else h.squeeze(0)

    def _inputs(self, name: str, input: Tensor, states: list[Tensor | None], labels: list[str]):
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for label, state in zip(labels, states):
            if state is not None and state.dim() not in (1, 2):
                raise ValueError(
                    f"{name}: Expected {label} to be 1D or 2D, got {state.dim()}D instead"
                )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            states = [s if s is None else s.unsqueeze(0) for s in states]
        if any(s is None for s in states):
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            states = [zeros if s is None else s for s in states]
        self._check_step(input, states)
        return input, states, is_batched


class RNNCell(_CellBase):
    """Drop-in for torch.nn.RNNCell."""

    _torch_class = nn.RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
        self.nonlinearity = nonlinearity
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._forward_hidden_only("RNNCell", input, hx)


class _GatedCell(_CellBase):
    """LSTMCell and GRUCell: torch.nn's constructor, and the options torch.nn lacks."""

    _mode: str

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        forget_bias: float | None = None,
        dropconnect: float = 0.0,
        zoneout: float = 0.0,
    ) -> None:
        super().__init__(
            self._mode,
            input_size,
            hidden_size,
            bias,
            device,
            dtype,
            forget_bias,
            dropconnect,
            zoneout,
        )


class GRUCell(_GatedCell):
    """Drop-in for torch.nn.GRUCell."""

    _torch_class = nn.GRUCell
    _mode = "GRU"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._forward_hidden_only("GRUCell", input, hx)


class LSTMCell(_GatedCell):
    """Drop-in for torch.nn.LSTMCell."""

    _torch_class = nn.LSTMCell
    _mode = "LSTM"

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        if hx is None:  # zeros, which the operator makes
            done = self._fast_step(input, None, None)
        elif type(hx) in (tuple, list) and len(hx) == 2 and hx[0] is not None and hx[1] is not None:
            done = self._fast_step(input, *hx)  # (a None would pass as zeros: torch.nn refuses it)
        else:
            done = None
        if done is not None:
            return done
        states = [None, None] if hx is None else _lstm_states(hx, "lstm_cell")
        input, (h, c), is_batched = self._inputs("LSTMCell", input, states, ["hx[0]", "hx[1]"])
        if c.dtype == input.dtype or torch._C._is_any_autocast_enabled():
            h, c = self._step(input, h, c)
        else:
            # A c_0 of another dtype (let through by _check_step): torch.nn's gates run in the
            # input's dtype, and c_0 promotes c_1 and h_1 (float64 for a float64 c_0). Its own
            # step computes that, with its autograd.
            h, c = torch._VF.lstm_cell(input, (h, c), *_weights(self, _CELL_NAMES))
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


class LayerNormLSTMCell(_LayerNormModule, LSTMCell):
    """One step of LayerNormLSTM: LSTMCell's constructor, inputs and outputs, plus
    ln_weight_ih, ln_weight_hh [4 * hidden_size], ln_weight_cell and ln_bias_cell
    [hidden_size] (see LayerNormLSTM)."""


class LayerNormGRUCell(_LayerNormModule, GRUCell):
    """One step of LayerNormGRU: GRUCell's constructor, inputs and outputs, plus ln_weight_ih
    and ln_weight_hh [3 * hidden_size] (see LayerNormGRU)."""
