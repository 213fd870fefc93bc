"""torch.optim conventions: PyTorch's generic optimizer tests (test/test_optim.py, ``TestOptimRenewed``)
restated over torch's ``OptimizerInfo`` rows (``tests/torch_optim_db.py``) for our optimizers —
``vr=False`` with one backward per step and ``vr=True`` with k = 2 — and, as the control, for
torch's own SGD, Adam and AdamW rows.

Each test keeps torch's body; what differs is written where it does: gradients reach the
optimizer through ``row.samples`` (k backward passes), and constructions add ``row.base_kwargs``.
Documented exceptions (README "torch.optim conventions"), not run here: ``foreach``, ``fused``,
``differentiable`` and ``capturable`` are refused when on (tested in ``test_errors``), so torch's
foreach/fused parity, peak-memory and CUDA-graph tests have nothing to compare; multi-GPU and
CUDA-only tests need a GPU; ``test_rosenbrock_sparse`` sets sparse gradients directly, so it runs
with ``vr=False`` (VR with sparse gradients: ``test_sparse_embedding_vr_equals_dense``).
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import tempfile

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    TensorTracker,
    _get_optim_inputs_including_global_cliquey_kwargs,
)

from vrgd_ds import VRSGD, VRAdam, VRLamb, VRLars

from .torch_optim_db import ROWS, TORCH_ROWS

DEVICE, DTYPE = "cpu", torch.float32
ALL = pytest.mark.parametrize("row", ROWS + TORCH_ROWS, ids=lambda r: r.id)
OURS = pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)


class _Case:
    """The assertions of torch's TestCase that TensorTracker calls."""

    def assertGreater(self, a, b, msg=None):
        assert a > b, msg

    def assertTrue(self, x, msg=None):
        assert x, msg

    def assertEqual(self, a, b, **kwargs):
        torch.testing.assert_close(a, b, **kwargs)


# Rows whose update uses per-tensor quantities: VR (the layer mean of r), LAMB and LARS (norms).
_PER_TENSOR = {r.id for r in ROWS if r.base_kwargs.get("vr") or r.info.optim_cls.__name__ in ("VRLamb", "VRLars")}


def _inputs(row, skip=("differentiable",)):
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, row.info, skip=skip)


def _linear_closure(row, optimizer, weight, bias, inpt):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        row.samples.backward(loss, [weight, bias])
        return loss

    return closure


@ALL
def test_optim_infos_do_not_specify_global_cliquey_kwargs(row):
    for optim_input in row.info.optim_inputs_func(device=DEVICE):
        assert not any(f in optim_input.kwargs for f in ("foreach", "fused", "differentiable"))


@ALL
def test_errors(row):
    if row.info.optim_error_inputs_func is None:
        pytest.skip("no error inputs")
    optim_cls = row.info.optim_cls
    for error_input in row.info.optim_error_inputs_func(device=DEVICE, dtype=DTYPE):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    optim_cls(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    optim_cls(params, **kwargs)
        else:
            optim = optim_cls(params, **kwargs)
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    optim.step()
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    optim.step()


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@ALL
def test_forloop_goes_right_direction(row, contiguous, with_lrsched):
    schedulers_constructors = row.info.scheduler_inputs if with_lrsched else [None]
    for schedulers_constructor in schedulers_constructors:
        for optim_input in row.info.optim_inputs_func(device=DEVICE):
            if "foreach" in row.info.supported_impls:
                optim_input.kwargs["foreach"] = False
            if contiguous:
                weight = Parameter(torch.randn((10, 5)))
                bias = Parameter(torch.randn(10))
            else:
                weight = Parameter(torch.randn((10, 5, 2))[..., 0])
                bias = Parameter(torch.randn((10, 2))[..., 0])
            inpt = torch.randn(5)
            optimizer = row.make([weight, bias], **optim_input.kwargs)
            schedulers = [s(optimizer) for s in (schedulers_constructor or [])]
            closure = _linear_closure(row, optimizer, weight, bias, inpt)
            initial_value = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                for scheduler in schedulers:
                    if isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(loss)
                    else:
                        scheduler.step()
            if optim_input.kwargs.get("maximize", False):
                assert closure().item() > initial_value, optim_input.desc
            else:
                assert closure().item() < initial_value, optim_input.desc


@ALL
def test_param_group_with_lrscheduler_goes_right_direction(row):
    for schedulers_c in row.info.scheduler_inputs:
        weight = Parameter(torch.randn((10, 5)))
        bias = Parameter(torch.randn(10))
        inpt = torch.randn(5)
        optimizer = row.make([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]
        closure = _linear_closure(row, optimizer, weight, bias, inpt)
        initial_value = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for scheduler in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(loss)
                else:
                    scheduler.step()
        assert closure().item() < initial_value


@ALL
def test_tensor_lr(row):
    for optim_input in _inputs(row):
        weight = Parameter(torch.randn((10, 5)))
        weight_c = weight.detach().clone().requires_grad_(True)
        bias = Parameter(torch.randn(10))
        bias_c = bias.detach().clone().requires_grad_(True)
        inpt = torch.randn(5)
        kwargs = optim_input.kwargs
        kwargs.pop("lr", None)
        kwargs["lr"] = 1e-3
        optimizer_r = row.make([weight, bias], **kwargs)
        try:
            kwargs["lr"] = torch.tensor(kwargs["lr"])
            optimizer = row.make([weight_c, bias_c], **kwargs)
        except ValueError as e:
            assert "lr as a Tensor is not supported" in str(e)
            continue
        for _ in range(5):
            _linear_closure(row, optimizer_r, weight, bias, inpt)()
            _linear_closure(row, optimizer, weight_c, bias_c, inpt)()
            optimizer_r.step()
            optimizer.step()
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)


def _rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _drosenbrock(tensor):
    x, y = tensor
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


@pytest.mark.parametrize(
    "row", [r for r in ROWS + TORCH_ROWS if r.info.supports_sparse and r.samples.k == 1], ids=lambda r: r.id
)
def test_rosenbrock_sparse(row):
    """Sparse gradients (uncoalesced, as torch tortures them) against the same dense ones."""
    dtype = torch.float64
    kwarg_updates = row.info.metadata_for_sparse[0]
    seen, inputs = set(), []
    for optim_input in _inputs(row, skip=("differentiable", "fused")):
        # torch's selection: drop the keys the row's sparse metadata fixes, dedupe, then set them.
        for key in kwarg_updates:
            optim_input.kwargs.pop(key, None)
        hashable = tuple(sorted((k, repr(v)) for k, v in optim_input.kwargs.items()))
        if (optim_input.kwargs or not kwarg_updates) and hashable not in seen:
            seen.add(hashable)
            inputs.append({**optim_input.kwargs, **kwarg_updates})
    for kwargs in inputs:
        if kwargs.get("foreach"):
            continue
        params = [Parameter(torch.tensor([1.5, 1.5], dtype=dtype))]
        params_c = [Parameter(torch.tensor([1.5, 1.5], dtype=dtype))]
        optimizer = row.make(params, **kwargs)
        optimizer_c = row.make(params_c, **kwargs)

        def get_grad(param, sparse_grad, w):
            grad = _drosenbrock(param)
            if sparse_grad:
                if w:
                    i, v = torch.tensor([[0, 0]]), torch.stack([grad[0] / 4.0, grad[0] - grad[0] / 4.0])
                else:
                    i, v = torch.tensor([[1, 1]]), torch.stack([grad[1] - grad[1] / 4.0, grad[1] / 4.0])
                return torch.sparse_coo_tensor(i, v, (2,), dtype=v.dtype)
            return torch.stack([grad[0], torch.zeros_like(grad[0])] if w else [torch.zeros_like(grad[1]), grad[1]])

        def evaluate(opt, ps, sparse_grad, w):
            opt.zero_grad()
            loss = _rosenbrock(ps[0])
            with torch.no_grad():
                ps[0].grad = get_grad(ps[0].detach(), sparse_grad, w)
            return loss

        for i in range(60):
            w = i % 2
            optimizer.step(functools.partial(evaluate, optimizer, params, True, w))
            optimizer_c.step(functools.partial(evaluate, optimizer_c, params_c, False, w))
            torch.testing.assert_close(params, params_c, atol=5e-6, rtol=5e-6)


@OURS
def test_sparse_embedding_vr_equals_dense(row):
    """nn.Embedding(sparse=True) gives the same update as its dense twin (samples densified)."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 1))
    sparse = copy.deepcopy(dense)
    sparse[0].sparse = True
    optims = [row.make(m.parameters(), **row.info.optim_inputs_func(DEVICE)[0].kwargs) for m in (dense, sparse)]
    for step in range(3):
        for model, opt in zip((dense, sparse), optims):
            opt.zero_grad()
            for mb in range(2 if row.samples.k > 1 else 1):
                idx = torch.tensor([[step, mb + 1, 2], [3, 3, mb]])
                model(idx).pow(2).mean().backward()
            opt.step()
    assert sparse[0].weight.grad.is_sparse
    for a, b in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@ALL
def test_complex(row):
    for optim_input in _inputs(row, skip=("differentiable", "fused")):
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
        ]
        complex_optimizer = row.make(complex_params, **optim_input.kwargs)
        real_optimizer = row.make(real_params, **optim_input.kwargs)
        real_steps, complex_steps = [], []
        for _ in range(3):
            grads = [torch.randn_like(p) for p in real_params]
            real_steps += [p.detach().clone() for p in real_params]
            complex_steps += [
                torch.view_as_real_copy(p.detach()) if p.is_complex() else p.detach().clone() for p in complex_params
            ]
            row.samples.set_grads(real_params, grads)
            row.samples.set_grads(
                complex_params,
                [torch.view_as_complex(g) if p.is_complex() else g for p, g in zip(complex_params, grads)],
            )
            real_optimizer.step()
            complex_optimizer.step()
        torch.testing.assert_close(
            real_params, [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
        )
        torch.testing.assert_close(complex_steps, real_steps)


@pytest.mark.parametrize("row", [r for r in ROWS + TORCH_ROWS if r.id not in _PER_TENSOR], ids=lambda r: r.id)
def test_complex_2d(row):
    """A complex tensor against its real and imaginary parts as two tensors: only for element-wise
    rules. Per-tensor quantities (VR's layer mean of r, LAMB's and LARS's norms) see one tensor of 2J
    elements in one run and two of J in the other (documented; ``test_complex`` is their check)."""
    for optim_input in _inputs(row, skip=("differentiable", "fused")):
        _complex_2d_case(row, optim_input.kwargs)


def _complex_2d_case(row, kwargs):
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    optim1 = row.make([a1], **kwargs)
    optim2 = row.make([a1_real, a1_imag], **kwargs)
    case = _Case()
    trackers = [TensorTracker() for _ in range(5)]
    a1_reals, a1_imags, a1_grad_reals, a1_grad_imags, losses = trackers

    def closure1():
        optim1.zero_grad()
        loss = _rosenbrock(a1).abs()
        row.samples.backward(loss, [a1])
        a1_reals.add(a1.real)
        a1_imags.add(a1.imag)
        a1_grad_reals.add(a1.grad.real)
        a1_grad_imags.add(a1.grad.imag)
        losses.add(loss)
        return loss

    def closure2():
        optim2.zero_grad()
        a1_reals.pop_check_set(a1_real, case)
        a1_imags.pop_check_set(a1_imag, case)
        loss = _rosenbrock(torch.complex(a1_real, a1_imag)).abs()
        losses.pop_check_set(loss, case)
        if row.samples.k == 1:
            loss.backward()
        else:  # the same two samples as closure1's: the noise of a1 split into its two parts
            noise = 0.1 * torch.sin(0.7 * torch.arange(4.0) + 0.3).view(2, 2)
            extra = (a1_real * noise[:, 0]).sum() + (a1_imag * noise[:, 1]).sum()
            (loss * 0.25 + extra).backward(retain_graph=True)
            (loss * 0.75 - extra).backward()
        a1_grad_reals.pop_check_set(a1_real.grad, case)
        a1_grad_imags.pop_check_set(a1_imag.grad, case)
        return loss

    for _ in range(3):
        closure1()
        closure2()
        optim1.step()
        optim2.step()
        torch.testing.assert_close(a1.real, a1_real)
        torch.testing.assert_close(a1.imag, a1_imag)
    assert all(t.all_popped() for t in trackers)


@ALL
def test_param_groups_weight_decay(row):
    for optim_input in _inputs(row):
        weight_kwargs = optim_input.kwargs
        bias_kwargs = copy.deepcopy(optim_input.kwargs)
        bias_kwargs["weight_decay"] = 0.0
        weight = Parameter(torch.randn((10, 5)))
        bias = Parameter(torch.randn(10))
        inpt = torch.randn(5)
        optimizer = row.make([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)])
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            row.samples.backward(loss, [weight, bias])
            optimizer.step()
        if optim_input.kwargs.get("maximize", False):
            assert loss.item() > initial_value
        else:
            assert loss.item() < initial_value


@ALL
def test_param_groups_lr(row):
    for optim_input in _inputs(row):
        if "lr" not in optim_input.kwargs or optim_input.kwargs["lr"] == 0:
            optim_input.kwargs["lr"] = 1e-3
        weight = Parameter(torch.randn((10, 5)))
        bias = Parameter(torch.randn(10))
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.clone()
        inpt = torch.randn(5)
        optimizer = row.make([dict(params=[weight, bias], **optim_input.kwargs), dict(params=[irrelevant])], lr=1e-28)
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            # irrelevant.grad = rand, through the same backward passes
            total = loss + (irrelevant * torch.rand_like(irrelevant)).sum()
            row.samples.backward(total, [weight, bias, irrelevant])
            optimizer.step()
        if optim_input.kwargs.get("maximize", False):
            assert loss.item() > initial_value
        else:
            assert loss.item() < initial_value
        torch.testing.assert_close(irrelevant, irrelevant_clone)


@ALL
def test_step_is_noop_when_params_have_no_grad(row):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old_params = [p.detach().clone() for p in params]
    for optim_input in _inputs(row, skip=()):
        optimizer = row.make(params, **optim_input.kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))
    torch.testing.assert_close(params, old_params, rtol=0, atol=0)


@ALL
def test_step_is_noop_for_zero_grads(row):
    param = torch.randn((5, 1), requires_grad=True)
    old_param = param.detach().clone()
    for optim_input in _inputs(row, skip=()):
        kwargs = optim_input.kwargs
        if kwargs.get("weight_decay", 0) != 0:
            continue
        if row.info.optim_cls.__name__ == "AdamW":
            kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr", 1e-5), torch.Tensor) else 1e-5
        params = [param.clone()] if kwargs.get("differentiable", False) else [param]
        optimizer = row.make(params, **kwargs)
        row.samples.set_grads(params, [torch.zeros_like(params[0])])
        optimizer.step(lambda: torch.tensor([1.0]))
        torch.testing.assert_close(old_param, params[0], msg=optim_input.desc)


@ALL
def test_optimizer_can_be_printed(row):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in _inputs(row, skip=()):
        assert repr(row.make(params, **optim_input.kwargs))


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict):
    new_state_dict = copy.deepcopy(state_dict)
    for pg in new_state_dict["param_groups"]:
        pg.pop("param_names", None)
    return new_state_dict


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@ALL
def test_state_dict_deterministic(row, is_named_optim0, is_named_optim1):
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for optim_input in _inputs(row):
        optimizer = row.make(_named([weight, bias], is_named_optim0), **optim_input.kwargs)
        closure = _linear_closure(row, optimizer, weight, bias, inpt)
        for _ in range(10):
            closure()
            optimizer.step()
        with torch.no_grad():
            weight_c = Parameter(weight.clone())
            bias_c = Parameter(bias.clone())
        optimizer_c = row.make(_named([weight_c, bias_c], is_named_optim1), **optim_input.kwargs)
        closure_c = _linear_closure(row, optimizer_c, weight_c, bias_c, inpt)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            closure()
            closure_c()
            optimizer.step()
            optimizer_c.step()
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)
        _assert_equal(_without_param_names(optimizer.state_dict()), _without_param_names(optimizer_c.state_dict()))
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        _assert_equal(
            _without_param_names(optimizer.state_dict())["param_groups"][-1],
            _without_param_names(optimizer_c.state_dict())["param_groups"][-1],
        )


def _assert_equal(a, b, path="") -> None:
    """torch's TestCase.assertEqual on state dicts: tensors close, everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _assert_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a) or torch.is_tensor(b):
        torch.testing.assert_close(a, b, msg=path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _conv_bn():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _fwd_bwd(row, optim, model, inpt):
    optim.zero_grad()
    loss = model(inpt).sum()
    row.samples.backward(loss, list(model.parameters()))
    return loss


@ALL
def test_can_load_older_state_dict(row):
    for optim_input in _inputs(row):
        model, inpt = _conv_bn()
        optimizer = row.make(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            _fwd_bwd(row, optimizer, model, inpt)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        for group in old_state_dict["param_groups"]:
            for flag in row.info.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old_state_dict)
        _fwd_bwd(row, optimizer, model, inpt)
        optimizer.step()


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@ALL
def test_can_load_from_to_named_state_dict(row, is_named_optim0, is_named_optim1):
    for optim_input in _inputs(row):
        model, inpt = _conv_bn()
        optimizer = row.make(model.named_parameters() if is_named_optim0 else model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            _fwd_bwd(row, optimizer, model, inpt)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        optimizer2 = row.make(model.named_parameters() if is_named_optim1 else model.parameters(), **optim_input.kwargs)
        optimizer2.load_state_dict(old_state_dict)
        _fwd_bwd(row, optimizer2, model, inpt)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight",
                "0.bias",
                "1.weight",
                "1.bias",
            ]


@pytest.mark.parametrize("is_named_optim", [True, False])
@ALL
def test_save_load_equality_with_weights_only(row, is_named_optim):
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for optim_input in _inputs(row):
        optimizer = row.make(_named([weight, bias], is_named_optim), **optim_input.kwargs)
        closure = _linear_closure(row, optimizer, weight, bias, inpt)
        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            _assert_equal(torch.load(f, weights_only=False), sd)
            f.seek(0)
            _assert_equal(torch.load(f, weights_only=True), sd)


@ALL
def test_load_nontensor_step(row):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    grads = [torch.rand_like(p) for p in params]
    for optim_input in _inputs(row):
        optimizer = row.make(params, **optim_input.kwargs)
        for _ in range(3):
            row.samples.set_grads(params, grads)
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if "step" in p_state and torch.is_tensor(p_state["step"]):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        row.samples.set_grads(params, grads)
        optimizer.step()


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@ALL
def test_state_dict_and_load_state_dict_hooks(row):
    """torch's test_state_dict_pre_hook, _post_hook, _pre_post_hook, test_load_state_dict_pre_hook_and_prepend,
    _post_hook and _pre_post_hook, one after the other."""
    for optim_input in _inputs(row, skip=()):
        _state_dict_hooks_case(functools.partial(_fresh, row, optim_input.kwargs))


def _fresh(row, kwargs):
    return row.make([torch.rand(2, 3, requires_grad=True)], **kwargs)


def _state_dict_hooks_case(fresh):
    optim = fresh()
    optim.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert optim.state_dict()["state"]["test"] == 1
    optim = fresh()
    optim.register_state_dict_post_hook(_state_dict_post_hook)
    assert not optim.state_dict()["ran_state_dict_pre_hook"]
    optim = fresh()
    optim.register_state_dict_pre_hook(_state_dict_pre_hook)
    optim.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = optim.state_dict()
    assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]

    optim = fresh()
    state_dict = optim.state_dict()
    optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    optim.load_state_dict(state_dict)
    assert optim.param_groups[0]["lr"] == 0.002
    optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    optim.load_state_dict(state_dict)
    assert optim.param_groups[0]["lr"] == 0.002
    optim = fresh()
    optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    optim.load_state_dict(optim.state_dict())
    assert not optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]
    optim = fresh()
    optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    optim.load_state_dict(optim.state_dict())
    assert optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]


@ALL
def test_step_hooks(row):
    """torch's test_step_post_hook, test_step_pre_hook and test_step_all_hooks."""
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in _inputs(row, skip=()):
        _step_hooks_case(row.make(params, **optim_input.kwargs), params)


def _step_hooks_case(optim, params):
    data = [2]
    handle = optim.register_step_post_hook(lambda *_: data.append(data.pop() + 2))
    optim.step()
    optim.step()
    assert data == [6]
    handle.remove()
    optim.step()
    assert data == [6]

    data = [5]
    handle = optim.register_step_pre_hook(lambda *_: data.append(data.pop() + 2))
    optim.step()
    optim.step()
    assert data == [9]
    handle.remove()
    optim.step()
    assert data == [9]

    optim2 = torch.optim.SGD(params)
    order = []
    handles = [
        register_optimizer_step_pre_hook(lambda *_: order.append(0)),
        register_optimizer_step_post_hook(lambda *_: order.append(5)),
        optim.register_step_pre_hook(lambda *_: order.append(1)),
        optim.register_step_post_hook(lambda *_: order.append(2)),
        optim2.register_step_pre_hook(lambda *_: order.append(1)),
        optim2.register_step_post_hook(lambda *_: order.append(2)),
    ]
    optim.step()
    assert order == [0, 1, 2, 5]
    optim2.step()
    optim.step()
    assert order == [0, 1, 2, 5] * 3
    for h in handles:
        h.remove()
    optim.step()
    optim2.step()
    assert order == [0, 1, 2, 5] * 3


@ALL
def test_deepcopy_copies_all_public_attrs(row):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    grads = [torch.rand_like(p) for p in params]

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in _inputs(row):
        optimizer = row.make(params, **optim_input.kwargs)
        for _ in range(3):
            row.samples.set_grads(params, grads)
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer))


@ALL
def test_non_empty_state(row):
    model = torch.nn.Linear(5, 5)
    inpt = torch.rand(2, 5)
    for optim_input in row.info.optim_inputs_func(device=DEVICE):
        optim = row.make(model.parameters(), **optim_input.kwargs)
        optim.zero_grad()
        row.samples.backward(model(inpt).sum(), list(model.parameters()))
        optim.step()
        for state in optim.state.values():
            assert len(state) > 0


# ---- beyond torch's generic tests: what the conventions mean for VR --------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@OURS
def test_copy_continues_as_the_original(row, how):
    """A deep-copied or unpickled optimizer (with its model) steps exactly as the original
    would: the options survive, a fresh collector watches the copied parameters."""
    kwargs = row.info.optim_inputs_func(DEVICE)[-1].kwargs
    model, inpt = _conv_bn()
    optimizer = row.make(model.parameters(), **kwargs)
    for _ in range(2):
        _fwd_bwd(row, optimizer, model, inpt)
        optimizer.step()
    if how == "deepcopy":
        model2, optimizer2 = copy.deepcopy((model, optimizer))
    else:
        buf = io.BytesIO()
        pickle.dump((model, optimizer), buf)
        buf.seek(0)
        model2, optimizer2 = pickle.load(buf)
    assert optimizer2.vr == optimizer.vr and (optimizer2.moment_source is None) == (optimizer.moment_source is None)
    for _ in range(2):
        for m, o in ((model, optimizer), (model2, optimizer2)):
            _fwd_bwd(row, o, m, inpt)
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_named_parameters_keep_names_and_statistics():
    model, _ = _conv_bn()
    opt = VRLamb(model.named_parameters(), weight_decay=0.01, weight_decay_exclude_1d=True)
    names = [g["param_names"] for g in opt.state_dict()["param_groups"]]
    assert names == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert opt._names[id(model[0].weight)] == "0.weight"


def test_impl_flags_off_values_accepted():
    p = Parameter(torch.randn(3))
    for flags in (
        dict(foreach=None, fused=None),
        dict(foreach=False, fused=False, differentiable=False, capturable=False),
    ):
        VRAdam([p], **flags)
        VRSGD([p], **flags)


def test_state_step_is_an_int_and_torch_adam_state_loads():
    """state["step"] stays an int (DeepSpeed's checkpoint code reads it as one); torch.optim.Adam's
    state dict (a tensor step) loads, and continues as torch's Adam does."""
    model, inpt = _conv_bn()
    twin = copy.deepcopy(model)
    theirs = torch.optim.Adam(twin.parameters(), lr=0.01, foreach=False)
    for _ in range(2):
        theirs.zero_grad()
        twin(inpt).sum().backward()
        theirs.step()
    model.load_state_dict(twin.state_dict())
    ours = VRAdam(model.parameters(), lr=0.01, decoupled_weight_decay=False, gamma=0.5, vr=False)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # a state dict shares the optimizer's tensors
    assert all(type(s["step"]) is int and s["step"] == 2 for s in ours.state.values())
    assert ours.param_groups[0]["gamma"] == 0.5  # ours, kept where torch's groups have none
    for m, o in ((model, ours), (twin, theirs)):
        o.zero_grad()
        m(inpt).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lr_defaults_and_per_group_lr():
    """VRSGD's lr defaults to torch.optim.SGD's 1e-3; VRLars has no default but takes one per group."""
    p, q = Parameter(torch.randn(3)), Parameter(torch.randn(2))
    assert VRSGD([p]).param_groups[0]["lr"] == 1e-3
    assert [g["lr"] for g in VRSGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}]).param_groups] == [0.1, 0.2]
    assert [g["lr"] for g in VRLars([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}]).param_groups] == [
        0.1,
        0.2,
    ]
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        VRLars([{"params": [p], "lr": 0.1}, {"params": [q]}])
