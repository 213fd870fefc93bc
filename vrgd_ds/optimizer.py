"""The VRGD optimizer skeleton shared by VRSGD, VRAdam, VRLamb and VRLars.

One step, per tensor θ the optimizer updates (VRGD.md §1–3):

1. raw GSNR r from the k gradient samples of this step (a *moment source*: the plain-PyTorch
   hook collector, or the DeepSpeed glue's ZeRO-partitioned moments);
2. r ← clip(r / mean_θ(r), γ, 1), the mean over the whole parameter tensor (segmented sums
   completed across ranks for flat ZeRO shards);
3. optional GSNR momentum p̂ (``gsnr_beta``);
4. the base optimizer's update with g' = r ⊙ G (subclasses' :meth:`_base_update`).

With ``vr=False`` nothing of 1–3 exists: no hooks, no buffers, no collectives; step 4 alone is
the base optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import required

from .collect import GradientMomentCollector, finite_flag, k_too_small_message
from .gsnr import normalize_and_clip, update_gsnr_momentum
from .moments import MomentSource
from .host import read
from .noise import NoiseScaleEMA, build_noise_stats, unbiased_from_paper_r
from .segments import SegmentLayout
from .shapes import full_dim

__all__ = ["VROptimizer"]

_QUANTILES = (0.1, 0.5, 0.9)
# torch >= 2.5 keeps the names of ``named_parameters()`` in ``param_groups[i]["param_names"]``.
_TORCH_KEEPS_PARAM_NAMES = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# torch.optim's implementation switches: only the off value is implemented (a for-loop over tensors).
_TORCH_IMPL_FLAGS = {
    "foreach": (None, False),
    "fused": (None, False),
    "differentiable": (False,),
    "capturable": (False,),
}
# Constructor options that hold for the whole optimizer: refused inside a parameter group.
_OPTIMIZER_WIDE = (
    "vr",
    "gradient_stats",
    "stats_interval",
    "micro_batch_size",
    "noise_ema_decay",
    "gsnr_estimator",
    "weight_decay_exclude_1d",
    "process_group",
    "moment_reduction",
)
GSNR_ESTIMATORS = ("paper", "unbiased")
_QUANTILE_SAMPLE = 65536


def _check_range(name: str, value, low, high, low_open=False, high_open=False, fix: str = "") -> None:
    bad = (
        value is None
        or not isinstance(value, (int, float))
        or isinstance(value, bool)
        or math.isnan(value)
        or (value <= low if low_open else value < low)
        or (value >= high if high_open else value > high)
    )
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r}; it must be in {lo}{low}, {high}{hi}.{' ' + fix if fix else ''}")


def check_adam_like(group: dict) -> None:
    """Validation shared by the Adam-family optimizers (VRAdam, VRLamb)."""
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected (beta1, beta2).")
    _check_range("beta parameter at index 0", betas[0], 0.0, 1.0, high_open=True)
    _check_range("beta parameter at index 1", betas[1], 0.0, 1.0, high_open=True)
    _check_range("epsilon value", group["eps"], 0.0, math.inf)
    _check_range("weight_decay", group["weight_decay"], 0.0, math.inf)


def init_adam_state(p: Tensor, state: dict, amsgrad: bool = False) -> None:
    state["step"] = 0
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def real_numel(p: Tensor) -> int:
    """Elements of ``p`` as the optimizer counts them: a complex tensor is its ``view_as_real``
    (real and imaginary parts are separate elements, as torch.optim treats them)."""
    return 2 * p.numel() if p.is_complex() else p.numel()


def real_dense(t: Tensor) -> Tensor:
    """``t`` as a dense real tensor: ``view_as_real`` of a complex one (a view), a sparse one
    densified (a copy; duplicate indices summed)."""
    if t.is_sparse:
        t = t.to_dense()
    return torch.view_as_real(t) if t.is_complex() else t


def step_counts(state: dict) -> int | Tensor:
    """The step count t of the parameter tensors a state belongs to (VRGD.md §0: t counts a
    tensor's own steps), in the one form every update rule takes: ``state["step"]`` (an int)
    while they all took the same steps — always so for a whole tensor — else one t per tensor
    of the flat shard's layout (``state["tensor_step"]``, created by :meth:`VROptimizer.step`
    once some tensor of the shard gets no gradient in a step). At least 1, as bias corrections
    need. ``state["step"]`` stays the state's own count: torch.optim and DeepSpeed's checkpoint
    code read it there."""
    steps = state.get("tensor_step")
    return state["step"] if steps is None else steps.clamp(min=1.0)


def _real_shape(p: Tensor) -> torch.Size:
    return p.shape + (2,) if p.is_complex() else p.shape


def flat_workspace(workspace: Tensor | None, grad: Tensor, flat_grad: Tensor) -> Tensor | None:
    """``workspace`` as a flat tensor for update rules that take flat tensors: ``flat_grad`` itself
    when the workspace is the gradient (so that the rule sees one tensor, not two views)."""
    if workspace is None:
        return None
    return flat_grad if workspace is grad else workspace.view(-1)


def advance_step_counts(state: dict, layout: SegmentLayout, absent: Tensor | None) -> None:
    """One more step for the state, and for each of its tensors that got a gradient (``absent``
    marks those that did not, one bool per tensor of ``layout``; None: all did)."""
    state["step"] += 1
    steps = state.get("tensor_step")
    if absent is None:
        if steps is not None:
            steps += 1
        return
    if steps is None:
        steps = state["tensor_step"] = torch.full(
            (layout.num_tensors,), float(state["step"] - 1), dtype=torch.float32, device=absent.device
        )
    steps += (~absent).to(steps)


def _grads_finite(param_groups) -> bool:
    """No NaN/inf in any ``.grad``: one foreach pass (a tensor's max-norm is non-finite exactly
    when it holds a NaN or inf) and one host read, whatever the number of tensors."""
    flag = finite_flag(p.grad for g in param_groups for p in g["params"])
    return True if flag is None else bool(read(flag))


def _check_impl_flags(flags: dict) -> None:
    for key, value in flags.items():
        if key in _TORCH_IMPL_FLAGS and not any(value is ok for ok in _TORCH_IMPL_FLAGS[key]):
            offs = " or ".join(repr(v) for v in _TORCH_IMPL_FLAGS[key])
            raise ValueError(
                f"{key}={value!r} is not supported by vrgd_ds yet: its step is one for-loop over the tensors "
                f"(torch.optim's default implementation). Pass {key}={offs}, or leave it out."
            )


class VROptimizer(Optimizer):
    """Base class: GSNR scaling (VRGD.md §1–2) in front of a base update rule.

    Common keyword arguments (all optimizers):
        vr (bool): apply VRGD (default: True). ``False`` is exactly the base optimizer.
        gamma (float): lower clip of normalized r, 0 < γ ≤ 1 (default: 0.1). γ = 1 gives r ≡ 1.
        gsnr_beta (float or None): GSNR momentum β3 in [0, 1), ``None`` = off (default depends
            on the optimizer: 0.9 for VRAdam/VRLamb, None for VRSGD/VRLars).
        gsnr_eps (float): relative variance floor, 0 < gsnr_eps < 1 (default: 1e-6).
        process_group: torch.distributed group over which plain-PyTorch moments are summed
            (default: the world group when initialized with > 1 rank).
        stats_interval (int): compute GSNR statistics every N steps, 0 = never (default: 0).
        weight_decay_exclude_1d (bool): put 1-D parameters (biases, norm weights) in a group
            with weight_decay 0 (LARS: also no trust ratio) (default: False).
        param_names (dict): ``{param: name}`` for statistics; named parameters
            (``model.named_parameters()``) work too, and are kept in
            ``param_groups[i]["param_names"]`` as torch.optim (≥ 2.5) keeps them.
        maximize (bool): maximize the objective (the update uses −G; r does not depend on the
            sign) (default: False).
        foreach, fused (None or False), differentiable, capturable (False): torch.optim's
            implementation switches, accepted at their off values; anything else is a ValueError.
    """

    # Group keys added after the first release, with the behaviour of state dicts without them.
    _legacy_group_defaults: dict[str, Any] = {"maximize": False}
    # Overrides applied to 1-D parameters by ``weight_decay_exclude_1d``.
    _exclude_1d_overrides: dict[str, Any] = {"weight_decay": 0.0}

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        vr: bool = True,
        process_group=None,
        stats_interval: int = 0,
        weight_decay_exclude_1d: bool = False,
        param_names: dict | None = None,
        gradient_stats: bool | None = None,
        micro_batch_size: int | None = None,
        noise_ema_decay: float = 0.99,
        gsnr_estimator: str = "paper",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        capturable: bool = False,
    ):
        _check_impl_flags(dict(foreach=foreach, fused=fused, differentiable=differentiable, capturable=capturable))
        defaults = {**defaults, "maximize": maximize}
        if not isinstance(vr, bool):
            raise ValueError(f"Invalid vr: {vr!r}; it must be True or False.")
        if gradient_stats is not None and not isinstance(gradient_stats, bool):
            raise ValueError(f"Invalid gradient_stats: {gradient_stats!r}; it must be True, False or None (= vr).")
        if micro_batch_size is not None and (
            isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1
        ):
            raise ValueError(
                f"Invalid micro_batch_size: {micro_batch_size!r}; it must be an int >= 1 (examples per "
                "backward pass), or None (statistics per micro-batch)."
            )
        if gsnr_estimator not in GSNR_ESTIMATORS:
            raise ValueError(
                f"Invalid gsnr_estimator: {gsnr_estimator!r}; use one of {GSNR_ESTIMATORS} "
                '("paper": r of eq. 7; "unbiased": r~ = ((k-1)r - 1)/k, VRGD.md §5).'
            )
        if not isinstance(stats_interval, int) or stats_interval < 0:
            raise ValueError(f"Invalid stats_interval: {stats_interval!r}; it must be an int >= 0 (0 = off).")
        params = list(params) if not isinstance(params, Tensor) else params
        #: True when the user passed one flat list of tensors (no parameter groups).
        self.built_from_flat_list = isinstance(params, list) and bool(params) and not isinstance(params[0], dict)
        groups, names = self._normalize_params(params, weight_decay_exclude_1d)
        if param_names:
            names.update({id(p): n for p, n in param_names.items()})
        super().__init__(groups, defaults)
        self.vr = vr
        #: Gradient-noise statistics every step (:meth:`noise_stats`); default: on with VR.
        self.gradient_stats = vr if gradient_stats is None else gradient_stats
        #: Examples per gradient sample (b of VRGD.md §5); DeepSpeed sets train_micro_batch_size_per_gpu.
        self.micro_batch_size = micro_batch_size
        self.gsnr_estimator = gsnr_estimator
        self._noise_ema = NoiseScaleEMA(noise_ema_decay)
        # Per flat tensor: (names, ΣS², ΣQ, mean r̃ or None, numels, had a sample), on the device.
        # (names, ΣS², ΣQ, mean r̃ or None, numels, present, already read to the host)
        self._noise_parts: list[tuple[list[str], Tensor, Tensor, Tensor | None, Tensor, Tensor, bool]] = []
        self._noise_k = 0
        self._noise_scale = 1.0
        self._last_noise: dict = {}
        self.stats_interval = stats_interval
        self.weight_decay_exclude_1d = weight_decay_exclude_1d
        self.skipped_steps = 0
        self._steps_ignored = False
        self._names = names
        self._layouts: dict[int, SegmentLayout] = {}
        self._last_stats: dict[str, dict[str, float]] = {}
        #: Where the step's gradient samples come from (the MomentSource protocol, vrgd_ds/moments.py).
        self.moment_source: MomentSource | None = (
            GradientMomentCollector(
                [p for g in self.param_groups for p in g["params"]], process_group, self._names, check_finite=vr
            )
            if vr or self.gradient_stats
            else None
        )

    # ---- construction -------------------------------------------------------------------
    def _normalize_params(self, params, exclude_1d: bool):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts, not a Tensor")
        params = list(params)
        if len(params) == 0:
            raise ValueError("optimizer got an empty parameter list")
        names: dict[int, str] = {}
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        groups = []
        for group in params:
            group = dict(group)
            plist = []
            for item in [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"]):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    names[id(item[1])] = item[0]
                    item = item[1]
                plist.append(item)
            group.pop("param_names", None)
            if exclude_1d:
                # The whole shape: under zero.Init every tensor is a (0,) placeholder (shapes.py).
                multi = [p for p in plist if full_dim(p) > 1]
                single = [p for p in plist if full_dim(p) <= 1]
                if multi:
                    groups.append({**group, "params": multi})
                if single:
                    groups.append({**group, **self._exclude_1d_overrides, "params": single})
            else:
                groups.append({**group, "params": plist})
        if _TORCH_KEEPS_PARAM_NAMES and names:
            # Named parameters stay named, as torch.optim keeps them (param_groups[i]["param_names"]);
            # torch refuses a mix of named and unnamed ones.
            for group in groups:
                group["params"] = [(names[id(p)], p) if id(p) in names else p for p in group["params"]]
        return groups, names

    def add_param_group(self, param_group: dict) -> None:
        wide = sorted(k for k in param_group if k in _OPTIMIZER_WIDE)
        if wide:
            raise ValueError(
                f"{', '.join(wide)} in a parameter group: an optimizer-wide option (the moments of all tensors are "
                "collected and reduced together), not a per-group one. Pass it to the constructor; for the base "
                "update on some tensors only, give their group gamma=1.0 (r = 1: the base update up to rounding), "
                "or put them in a second optimizer with vr=False."
            )
        _check_impl_flags(param_group)
        super().add_param_group(param_group)
        try:
            self._validate_common(self.param_groups[-1])
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        source = getattr(self, "moment_source", None)
        if source is not None:
            source.watch(self.param_groups[-1]["params"])

    @staticmethod
    def _validate_common(group: dict) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}.")
            lr = float(lr)
        _check_range("lr", lr, 0.0, math.inf)
        if not isinstance(group.get("maximize", False), bool):
            raise ValueError(f"Invalid maximize: {group['maximize']!r}; it must be True or False.")
        _check_range(
            "gamma", group["gamma"], 0.0, 1.0, low_open=True, fix="Use 0 < gamma <= 1 (gamma=1 disables VRGD)."
        )
        if group["gsnr_beta"] is not None:
            _check_range(
                "gsnr_beta",
                group["gsnr_beta"],
                0.0,
                1.0,
                high_open=True,
                fix="Use 0 <= gsnr_beta < 1, or None for no GSNR momentum.",
            )
        _check_range(
            "gsnr_eps",
            group["gsnr_eps"],
            0.0,
            1.0,
            low_open=True,
            high_open=True,
            fix="Use 0 < gsnr_eps < 1 (a floor on the variance relative to the second moment; default 1e-6).",
        )

    def _validate_group(self, group: dict) -> None:  # pragma: no cover - overridden
        pass

    # ---- hooks for the DeepSpeed glue -----------------------------------------------------
    def set_param_name(self, p: Tensor, name: str) -> None:
        """Name ``p`` in statistics and messages, unless it was given a name already (through
        ``param_names`` or named parameters). The DeepSpeed glue names the tensors it hands over."""
        self._names.setdefault(id(p), name)

    def layout_of(self, p: Tensor) -> SegmentLayout:
        layout = self._layouts.get(id(p))
        if layout is None:
            layout = SegmentLayout.whole(real_numel(p), self._names.get(id(p)))
            self._layouts[id(p)] = layout
        return layout

    def set_layout(self, p: Tensor, layout: SegmentLayout) -> None:
        if layout.numel != p.numel():
            raise ValueError(f"layout covers {layout.numel} elements, the tensor has {p.numel()}")
        self._layouts[id(p)] = layout

    def set_moment_source(self, source: MomentSource) -> None:
        """Replace the plain hook collector (used by the DeepSpeed glue; see vrgd_ds/moments.py)."""
        if self.moment_source is not None:
            self.moment_source.remove()
        self.moment_source = source

    # ---- zero_grad / state ----------------------------------------------------------------
    def ignore_steps(self, ignore: bool = True) -> None:
        """While ``ignore`` is set, :meth:`step` does nothing and returns None.

        DeepSpeed's fp16/bf16 wrappers "initialize optimizer states" by one ``step()`` on zero
        gradients while they are built; the DeepSpeed glue sets this around that construction so
        that state is created lazily at the first real step (t = 1, as without DeepSpeed).
        """
        self._steps_ignored = bool(ignore)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self.moment_source is not None:
            self.moment_source.on_zero_grad()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["vrgd"] = {"skipped_steps": self.skipped_steps, "noise_ema": self._noise_ema.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("vrgd", {})
        super().load_state_dict(state_dict)
        # state["step"] is an int here (DeepSpeed's checkpoint code reads it as one); torch.optim's
        # Adam keeps a tensor, and its state dicts (or ours with a tensor or float step) load too.
        for state in self.state.values():
            if isinstance(state, dict) and "step" in state and not isinstance(state["step"], int):
                state["step"] = int(round(float(state["step"])))
        self.skipped_steps = extra.get("skipped_steps", 0)
        if "noise_ema" in extra:  # absent in checkpoints of vrgd_ds before the noise statistics
            self._noise_ema.load_state_dict(extra["noise_ema"])

    # ---- copy.deepcopy / pickle ------------------------------------------------------------
    # torch.optim pickles defaults, state and param_groups only; ours also needs its options. The
    # moment source is not pickled (hooks, buffers, a process group): a copy gets a new plain
    # collector on its own parameters, starting with no samples (copy between steps).
    _PICKLED_OPTIONS = (
        "vr",
        "gradient_stats",
        "micro_batch_size",
        "gsnr_estimator",
        "stats_interval",
        "weight_decay_exclude_1d",
        "skipped_steps",
        "built_from_flat_list",
        "_noise_ema",
    )

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED_OPTIONS if k in self.__dict__})
        params = [p for g in self.param_groups for p in g["params"]]
        state["_param_name_list"] = [self._names.get(id(p)) for p in params]
        source = self.__dict__.get("moment_source")
        state["_attached_elsewhere"] = source is not None and not isinstance(source, GradientMomentCollector)
        return state

    def __setstate__(self, state: dict) -> None:
        name_list = state.pop("_param_name_list", None)
        attached_elsewhere = state.pop("_attached_elsewhere", False)
        super().__setstate__(state)
        for group in self.param_groups:
            # Loaded groups without a key (vrgd_ds before the option, or torch.optim's state dicts):
            # the value those were trained with, else this optimizer's default.
            for key, value in self._legacy_group_defaults.items():
                group.setdefault(key, value)
            for key, value in self.defaults.items():
                if value is not required and key not in _TORCH_IMPL_FLAGS:  # torch adds "differentiable"
                    group.setdefault(key, value)
        if "moment_source" in self.__dict__:
            return  # load_state_dict: the optimizer itself is complete
        # Unpickled or deep-copied (also from vrgd_ds releases that pickled torch.optim's three keys).
        self.__dict__.setdefault("vr", True)
        self.__dict__.setdefault("gradient_stats", self.vr)
        self.__dict__.setdefault("micro_batch_size", None)
        self.__dict__.setdefault("gsnr_estimator", "paper")
        self.__dict__.setdefault("stats_interval", 0)
        self.__dict__.setdefault("weight_decay_exclude_1d", False)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("built_from_flat_list", False)
        self.__dict__.setdefault("_noise_ema", NoiseScaleEMA())
        self._noise_parts, self._noise_k, self._noise_scale, self._last_noise = [], 0, 1.0, {}
        self._steps_ignored = False
        self._layouts, self._last_stats = {}, {}
        params = [p for g in self.param_groups for p in g["params"]]
        self._names = {id(p): n for p, n in zip(params, name_list or []) if n is not None}
        #: Set when the original was attached to a DeepSpeed engine: a copy cannot collect its samples.
        self._attached_elsewhere = attached_elsewhere
        self.moment_source = (
            GradientMomentCollector(params, None, self._names, check_finite=self.vr)
            if (self.vr or self.gradient_stats) and not attached_elsewhere
            else None
        )

    # ---- statistics ----------------------------------------------------------------------
    def gsnr_stats(self) -> dict[str, dict[str, float]]:
        """Per parameter tensor, from the last statistics step (``stats_interval``):
        ``gsnr_mean`` (mean raw r), ``gsnr_q10/q50/q90`` (raw r quantiles, where the tensor is
        whole on this rank), ``clip_frac`` (fraction of elements whose normalized r fell below
        γ), ``scale_mean`` (mean scale applied to the gradient, after momentum)."""
        return self._last_stats

    def noise_stats(self) -> dict:
        """Gradient-noise statistics of the last applied step (VRGD.md §5), ``{}`` before one.

        ``k``, ``micro_batch_size``; unbiased ``grad_norm_sq`` |G|² = (ΣS² − ΣQ)/(k(k−1)) and
        ``noise_trace`` tr Σ = b·(kΣQ − ΣS²)/(k(k−1)) over all tensors; ``b_simple`` = tr Σ/|G|²
        this step and ``b_simple_ema`` (ratio of EMAs, decay ``noise_ema_decay``); ``per_tensor``
        {name: grad_norm_sq, noise_trace, b_simple, gsnr_unbiased_mean}. Units: the gradient of
        the loss of one micro-batch — under DeepSpeed the loss scale and 1/gradient_accumulation
        are removed; in plain PyTorch each backward's loss is taken to be divided by the number of
        micro-batches this rank runs per step (as in the README example). See README
        "Gradient-noise statistics". Needs ``gradient_stats`` (on by default with ``vr=True``).
        """
        return self._last_noise

    def finish_noise_stats(self) -> None:
        """Turn the per-tensor sums gathered during this step into :meth:`noise_stats` (once per
        optimizer step: plain step() calls it; under DeepSpeed, after the wrapper's step)."""
        parts, self._noise_parts = self._noise_parts, []
        if not parts or self._noise_k < 2:
            return
        names = [n for part in parts for n in part[0]]
        # Every per-tensor vector of every part to the host in one transfer (one device sync),
        # then the tensors that got no gradient sample this step left out.
        with_unbiased = all(part[3] is not None for part in parts)
        columns = (1, 2, 4, 5, 3) if with_unbiased else (1, 2, 4, 5)
        # Parts read with their tensor's decisions are on the host already; the rest (sources
        # that need no decision read) come back in one transfer.
        on_device = [part for part in parts if not part[6]]
        device = on_device[0][1].device if on_device else torch.device("cpu")
        vectors = torch.cat([part[c].to(device, torch.float64).view(-1) for c in columns for part in parts])
        host = read(vectors) if on_device else vectors
        s2, q, numels, present, *rest = host.split(len(names))
        keep = present.nonzero().view(-1)
        names = [names[t] for t in keep.tolist()]
        s2, q, numels = s2[keep], q[keep], numels[keep]
        unbiased = rest[0][keep] if with_unbiased else None
        self._last_noise = build_noise_stats(
            names,
            s2,
            q,
            self._noise_k,
            self.micro_batch_size,
            self._noise_ema,
            sample_scale=self._noise_scale,
            gsnr_unbiased_mean=unbiased,
            numels=numels,
        )

    def gsnr_summary(self) -> dict[str, float]:
        """Element-weighted means over all tensors of :meth:`gsnr_stats` (empty if none)."""
        stats = self._last_stats
        if not stats:
            return {}
        total = sum(s["numel"] for s in stats.values())
        out = {}
        for key, outkey in (
            ("gsnr_mean", "gsnr_mean"),
            ("clip_frac", "gsnr_clip_frac"),
            ("scale_mean", "gsnr_scale_mean"),
        ):
            out[outkey] = sum(s[key] * s["numel"] for s in stats.values()) / total
        out["step"] = max(s["step"] for s in stats.values())
        return out

    def _record_stats(
        self, layout: SegmentLayout, raw: Tensor, normalized_unclipped_low: Tensor, scale: Tensor, step: int
    ):
        sums = layout.tensor_sums(
            [raw, normalized_unclipped_low.float(), scale if scale.dim() else scale.expand_as(raw)]
        )
        numels = layout.tensor_numels.to(sums.device)
        for t in range(layout.num_tensors):
            entry = {
                "numel": float(numels[t]),
                "step": float(step),
                "gsnr_mean": float(sums[0, t] / numels[t]),
                "clip_frac": float(sums[1, t] / numels[t]),
                "scale_mean": float(sums[2, t] / numels[t]),
            }
            if layout.is_whole:
                flat = raw.reshape(-1)
                if flat.numel() > _QUANTILE_SAMPLE:
                    flat = flat[:: flat.numel() // _QUANTILE_SAMPLE + 1]
                qs = torch.quantile(flat, torch.tensor(_QUANTILES, dtype=flat.dtype, device=flat.device))
                for q, v in zip(_QUANTILES, qs.tolist()):
                    entry[f"gsnr_q{int(q * 100)}"] = v
            self._last_stats[layout.names[t]] = entry

    # ---- the step -------------------------------------------------------------------------
    def _init_state(self, p: Tensor, state: dict, group: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def _base_update(
        self, p: Tensor, grad: Tensor, state: dict, group: dict, layout: SegmentLayout, workspace: Tensor | None = None
    ) -> None:  # pragma: no cover
        """The base optimizer's update of ``p`` with gradient ``grad`` (g'); ``workspace``: a tensor
        of ``p``'s shape the update rule may overwrite (``grad`` itself when it is this step's
        scaled gradient; see vrgd_ds/update_rules.py)."""
        raise NotImplementedError

    def _lr_value(self, lr: Tensor) -> float:
        """A tensor lr as a number, read once per change (its in-place version), not per tensor:
        on an accelerator each read is a device sync."""
        cache = self.__dict__.setdefault("_lr_reads", {})  # absent on optimizers unpickled from older releases
        key = id(lr)
        hit = cache.get(key)
        if hit is None or hit[0] is not lr or hit[1] != lr._version:
            hit = cache[key] = (lr, lr._version, float(read(lr)))
        return hit[2]

    def _update(
        self, p: Tensor, grad: Tensor, state: dict, group: dict, layout: SegmentLayout, workspace: Tensor | None
    ) -> None:
        """:meth:`_base_update` with torch.optim's conventions applied: a tensor lr as a number,
        ``maximize`` (the update with −g'), sparse gradients densified, and complex tensors as their
        ``view_as_real`` (parameter, gradient and state; new state tensors stored complex, as torch)."""
        if isinstance(group["lr"], Tensor):
            group = {**group, "lr": self._lr_value(group["lr"])}
        if grad.is_sparse:
            grad = workspace = grad.to_dense()
        if group.get("maximize", False):
            grad = workspace = torch.neg(grad, out=workspace)
        if not p.is_complex():
            self._base_update(p, grad, state, group, layout, workspace)
            return
        in_place = workspace is grad
        grad = real_dense(grad)
        workspace = grad if in_place else (None if workspace is None else real_dense(workspace))
        real_state = {k: real_dense(v) if torch.is_tensor(v) and v.is_complex() else v for k, v in state.items()}
        p_real = torch.view_as_real(p)
        self._base_update(p_real, grad, real_state, group, layout, workspace)
        for key, value in real_state.items():
            if key not in state or not torch.is_tensor(value):
                new = torch.is_tensor(value) and value.shape == p_real.shape and not value.is_complex()
                state[key] = torch.view_as_complex(value) if new else value

    def _workspace(self, p: Tensor) -> Tensor | None:
        """Scratch for the update of ``p`` when its gradient is the user's (``vr=False``): on the
        CPU one tensor of ``p``'s size kept across steps, since allocating it every step, as
        torch.optim does, costs more there than the arithmetic (a fresh large allocation is new
        pages from the OS, faulted in on first touch — ZeRO-Offload's host step). None elsewhere:
        accelerator allocators reuse memory already. Not state: never checkpointed."""
        if p.device.type != "cpu":
            return None
        cache = self.__dict__.setdefault("_scratch", {})  # absent on optimizers unpickled from older releases
        buf = cache.get(id(p))
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = cache[id(p)] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf

    def _finite(self, source) -> bool:
        """The source's moments and the gradients all finite (a source whose ``all_finite``
        covers the gradients too, ``all_finite_covers_grads``, spares the second read)."""
        if not source.all_finite():
            return False
        return getattr(source, "all_finite_covers_grads", False) or _grads_finite(self.param_groups)

    def _layer_gsnr(self, p: Tensor, layout: SegmentLayout, eps: float):
        """Phase 1: raw r of ``p`` (flat) and the per-tensor mean of r, completed across ranks.

        Returns ``(raw, layer_mean, absent, all_absent, some_absent)`` — ``absent`` marks tensors
        that got no gradient sample on any rank this step (None if the source cannot tell; the two
        bools say whether all / some did) — or None when some rank saw a non-finite value (then
        every rank skips: the decision rides in the same collective). The three decisions are one
        host read.
        """
        source = self.moment_source
        n = layout.num_tensors
        # ΣS², ΣQ per tensor for the noise statistics: before r overwrites Q.
        moments = source.moment_sums(p, layout).view(-1) if self.gradient_stats else None
        raw = source.raw_gsnr(p, eps).view(-1) if self.vr else None
        if raw is not None and self.gsnr_estimator == "unbiased":
            # r~ = ((k−1)r − 1)/k (VRGD.md §5), no k-dependent floor; negative estimates are 0.
            raw.mul_((self._noise_k - 1) / self._noise_k).sub_(1.0 / self._noise_k).clamp_(min=0.0)
        counts = source.tensor_sample_counts(p, layout)
        pieces = [layout.local_sums([raw]).view(-1)] if raw is not None else [torch.zeros(n, device=p.device)]
        if counts is not None:
            pieces.append(counts)
        if moments is not None:
            pieces.append(moments)
        vec = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if layout.complete is not None:
            layout.complete(vec)
        absent = vec[n : 2 * n] == 0 if counts is not None else None
        layer_mean = vec[:n] / layout.tensor_numels.to(vec.device)
        unbiased = None
        if moments is not None and self.vr:
            paper = self.gsnr_estimator != "unbiased"
            unbiased = unbiased_from_paper_r(layer_mean, self._noise_k) if paper else layer_mean
        decide = layout.complete is not None or absent is not None
        host = None
        if decide:
            # One read for the decisions and this tensor's noise-statistics vectors: [finite flag |
            # counts | ΣS² | ΣQ | mean r̃]. A non-finite sample or gradient makes r, hence its
            # tensor's sum, non-finite: the completed sums tell every rank the same thing.
            pieces = [torch.isfinite(vec).all().view(1).to(vec.dtype)]
            if absent is not None:
                pieces.append(vec[n : 2 * n])
            if moments is not None:
                pieces += [vec[-2 * n :]] + ([unbiased.to(vec.dtype)] if unbiased is not None else [])
            host = read(torch.cat(pieces))
            if layout.complete is not None and not bool(host[0]):
                return None
        all_absent = some_absent = False
        at = 1
        if absent is not None:
            host_counts = host[at : at + n]
            at += n
            all_absent, some_absent = bool((host_counts == 0).all()), bool((host_counts == 0).any())
        if moments is not None:
            numels = layout.tensor_numels
            if host is not None:  # already on the host: finish_noise_stats reads nothing more
                m, mean_r = host[at : at + 2 * n], host[at + 2 * n :] if unbiased is not None else None
                present = host_counts > 0 if absent is not None else torch.ones(n, dtype=torch.bool)
                numels = numels.cpu()
            else:  # kept on the device: finish_noise_stats reads every part in one transfer
                m, mean_r = vec[-2 * n :], unbiased
                present = torch.ones(n, dtype=torch.bool, device=vec.device)
                numels = numels.to(vec.device)
            self._noise_parts.append((list(layout.names), m[:n], m[n:], mean_r, numels, present, host is not None))
        return raw, layer_mean, absent, all_absent, some_absent

    def _scaled_gradient(
        self, p: Tensor, group: dict, layout: SegmentLayout, state: dict, stats: bool, raw: Tensor, layer_mean: Tensor
    ) -> Tensor:
        """Phase 2: r ← clip(r / mean, γ, 1) (:func:`~vrgd_ds.gsnr.normalize_and_clip`), GSNR
        momentum, then g' = scale ⊙ G — all in place in ``raw`` (a buffer of this step's moments,
        free once r is used), so the step makes no full-size temporary here."""
        below_gamma = raw < group["gamma"] * layout.expand(layer_mean) if stats else None
        raw_for_stats = raw.clone() if stats else None
        scale = normalize_and_clip(raw, layer_mean, group["gamma"], layout=layout, out=raw)
        if group["gsnr_beta"] is not None:
            if "gsnr_momentum" not in state:
                state["gsnr_momentum"] = torch.zeros_like(scale)
                if state["step"] > 1:
                    # A state from a run without GSNR momentum (vr=False, gsnr_beta None, torch's
                    # Adam): p̂'s bias correction counts its own steps, from this one.
                    state["gsnr_momentum_start"] = state["step"] - 1
            momentum_steps = step_counts(state)
            if "gsnr_momentum_start" in state:
                momentum_steps = momentum_steps - state["gsnr_momentum_start"]
                if torch.is_tensor(momentum_steps):
                    momentum_steps = momentum_steps.clamp(min=1.0)
            scale = update_gsnr_momentum(
                state["gsnr_momentum"],
                scale,
                group["gsnr_beta"],
                momentum_steps,
                out=scale,
                layout=layout,
            )
        if stats:
            self._record_stats(layout, raw_for_stats, below_gamma, scale, state["step"])
        return scale.mul_(real_dense(p.grad).reshape(-1)).view(_real_shape(p))

    def _tensors_with_grad(self):
        """(tensor, its group, its state, its layout) for every tensor with a gradient; state is
        created here, lazily, as torch.optim does."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state, group)
                yield p, group, state, self.layout_of(p)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (VRGD.md §1–3). ``closure`` as in torch.optim."""
        if getattr(self, "_steps_ignored", False):  # absent on optimizers unpickled from older releases
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.moment_source is None:
            if getattr(self, "_attached_elsewhere", False):
                raise RuntimeError(
                    f"This {type(self).__name__} is a copy (copy.deepcopy or pickle) of one attached to a DeepSpeed "
                    "engine, whose gradient samples only the engine collects: it cannot step. Save and load "
                    "engine checkpoints instead (engine.save_checkpoint / load_checkpoint)."
                )
            for p, group, state, layout in self._tensors_with_grad():
                advance_step_counts(state, layout, None)
                self._update(p, p.grad, state, group, layout, self._workspace(p))
            return loss

        source = self.moment_source
        k = source.finalize()
        self._noise_k = k
        self._noise_scale = source.sample_scale()
        has_grads = any(p.grad is not None for g in self.param_groups for p in g["params"])
        if not has_grads:
            source.after_inner_step()
            return loss
        if k < 2:
            source.after_inner_step()
            raise RuntimeError(k_too_small_message(k))
        # Checked before any tensor is touched; the result is the same on every rank because
        # the moments were just summed across ranks and DDP's .grad is identical everywhere.
        # (Sources over flat ZeRO shards agree on it inside the layer-mean all-reduce instead.)
        # (A source whose all_finite() covers the gradients too spares the second read.)
        if self.vr and source.checks_finite_locally and not self._finite(source):
            self.skipped_steps += 1
            source.after_inner_step()
            return loss

        for p, group, state, layout in self._tensors_with_grad():
            phase1 = self._layer_gsnr(p, layout, group["gsnr_eps"])
            if not self.vr:  # gradient_stats only: the moments were summed; the update is the base one
                advance_step_counts(state, layout, None)
                self._update(p, p.grad, state, group, layout, self._workspace(p))
                continue
            if phase1 is None:
                self.skipped_steps += 1
                continue
            raw, layer_mean, absent, all_absent, some_absent = phase1
            if all_absent:
                continue  # no gradient for any of its tensors on any rank: skipped like torch.optim
            advance_step_counts(state, layout, absent if some_absent else None)
            stats = self.stats_interval > 0 and state["step"] % self.stats_interval == 0
            held = layout.hold(absent, p, state) if some_absent else None
            scaled = self._scaled_gradient(p, group, layout, state, stats, raw, layer_mean)
            # g' lives in a buffer of this step's moments: the update rule may overwrite it.
            self._update(p, scaled, state, group, layout, workspace=scaled)
            if held is not None:
                held.restore()
        source.after_inner_step()
        if source.ends_step_in_step:
            self.finish_noise_stats()
        return loss
