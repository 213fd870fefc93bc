"""Independent, brute-force reference of VRGD.md, written without any vrgd_ds code.

It takes the per-micro-batch gradients explicitly (one tensor per sample), forms mean, variance,
r, the per-tensor normalization, clipping and GSNR momentum by hand in float64, and applies the
base update rules by hand. Slow and obvious on purpose.
"""

from __future__ import annotations


import torch


def reference_gsnr(samples: list[torch.Tensor], gamma: float, eps: float = 1e-6) -> torch.Tensor:
    """VRGD.md §1–2 for one tensor from its k samples: normalized, clipped r (float64)."""
    k = len(samples)
    stack = torch.stack([s.double() for s in samples])
    mean = stack.sum(0) / k
    sq = (stack * stack).sum(0) / k
    var = sq - mean * mean
    r = torch.zeros_like(mean)
    for j in range(mean.numel()):
        sqj = sq.view(-1)[j].item()
        if sqj == 0:
            continue
        r.view(-1)[j] = mean.view(-1)[j].item() ** 2 / max(var.view(-1)[j].item(), eps * sqj)
    m = r.mean().item()
    if m == 0:
        return torch.full_like(r, gamma)
    return (r / m).clamp(min=gamma, max=1.0)


class ReferenceVR:
    """Brute-force VRGD optimizer over a list of parameters (float64 state, params updated in place)."""

    def __init__(self, params, kind: str, vr: bool = True, gamma: float = 0.1, gsnr_beta=None, gsnr_eps=1e-6, **hp):
        self.params = list(params)
        self.kind = kind
        self.vr = vr
        self.gamma = gamma
        self.gsnr_beta = gsnr_beta
        self.gsnr_eps = gsnr_eps
        self.hp = hp
        self.state = [dict(step=0) for _ in self.params]

    def step(self, samples_per_param: list[list[torch.Tensor]], grads: list[torch.Tensor]):
        """samples_per_param[i]: the k samples of param i; grads[i]: G the base optimizer uses."""
        for p, samples, G, st in zip(self.params, samples_per_param, grads, self.state):
            st["step"] += 1
            t = st["step"]
            G = G.double()
            if self.vr:
                r = reference_gsnr(samples, self.gamma, self.gsnr_eps)
                if self.gsnr_beta is not None:
                    b3 = self.gsnr_beta
                    st["p"] = b3 * st.get("p", torch.zeros_like(r)) + (1 - b3) * r
                    r = st["p"] / (1 - b3**t)
                g = r * G
            else:
                g = G
            theta = p.detach().double()
            new = getattr(self, "_" + self.kind)(theta, g, st, t)
            with torch.no_grad():
                p.copy_(new.to(p.dtype))

    def _sgd(self, theta, g, st, t):
        lr, mu = self.hp["lr"], self.hp.get("momentum", 0.0)
        damp, wd, nest = self.hp.get("dampening", 0.0), self.hp.get("weight_decay", 0.0), self.hp.get("nesterov", False)
        d = g + wd * theta
        if mu != 0:
            st["b"] = d.clone() if t == 1 else mu * st["b"] + (1 - damp) * d
            d = d + mu * st["b"] if nest else st["b"]
        return theta - lr * d

    def _adam(self, theta, g, st, t):
        lr, (b1, b2) = self.hp.get("lr", 1e-3), self.hp.get("betas", (0.9, 0.999))
        eps, wd = self.hp.get("eps", 1e-8), self.hp.get("weight_decay", 0.0)
        if self.hp.get("decoupled_weight_decay", True):
            theta = theta * (1 - lr * wd)
        else:
            g = g + wd * theta
        st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
        mh, vh = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
        return theta - lr * mh / (vh.sqrt() + eps)

    def _lamb(self, theta, g, st, t):
        lr, (b1, b2) = self.hp.get("lr", 1e-3), self.hp.get("betas", (0.9, 0.999))
        eps, wd = self.hp.get("eps", 1e-6), self.hp.get("weight_decay", 0.01)
        st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
        if self.hp.get("bias_correction", True):
            mh, vh = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
        else:
            mh, vh = st["m"], st["v"]
        u = mh / (vh.sqrt() + eps) + wd * theta
        if not self.hp.get("trust_ratio", True) or not (self.hp.get("use_nvlamb", True) or wd != 0):
            return theta - lr * u  # apex FusedLAMB's default: no ratio for a no-decay group
        wn, un = theta.norm().item(), u.norm().item()
        ratio = wn / un if wn > 0 and un > 0 else 1.0
        lo, hi = self.hp.get("min_trust_ratio"), self.hp.get("max_trust_ratio")
        if lo is not None:
            ratio = max(ratio, lo)
        if hi is not None:
            ratio = min(ratio, hi)
        return theta - lr * ratio * u

    def _lars(self, theta, g, st, t):
        lr, mu = self.hp["lr"], self.hp.get("momentum", 0.9)
        wd, eta, eps = (
            self.hp.get("weight_decay", 0.0),
            self.hp.get("trust_coefficient", 0.001),
            self.hp.get("eps", 1e-8),
        )
        d = g + wd * theta
        wn, gn = theta.norm().item(), g.norm().item()
        if wn > 0 and gn > 0:
            d = d * (eta * wn / (gn + wd * wn + eps))
        st["b"] = d.clone() if t == 1 else mu * st["b"] + d
        if self.hp.get("nesterov", False):
            return theta - lr * (d + mu * st["b"])
        return theta - lr * st["b"]


class ReferenceFusedLAMB:
    """apex ``FusedLAMB`` (apex/optimizers/fused_lamb.py + csrc/multi_tensor_lamb.cu), restated
    element by element in float64 from apex's source, without vrgd_ds code.

    ``groups``: ``[{"params": [tensors], "weight_decay": ...}, ...]``; every other key falls back
    to the constructor's values (apex's defaults: lr 1e-3, bias_correction, betas (0.9, 0.999),
    eps 1e-6, weight_decay 0.01, adam_w_mode, grad_averaging, max_grad_norm 1.0,
    use_nvlamb False). What apex does in ``step()``:

    1. global_grad_norm = ‖all gradients of all groups‖₂ (tensors without a gradient skipped);
       clip = global_grad_norm / max_grad_norm if global_grad_norm > max_grad_norm else 1 —
       ``max_grad_norm`` from the optimizer's defaults, not from the group.
    2. per group: ``step += 1`` (one count per group, also for tensors without a gradient);
       bias corrections 1 − β^step (1 without bias_correction); β3 = 1 − β1 with
       grad_averaging, else 1.
    3. per tensor with a gradient (stage 1): g = grad / clip;
       adam_w_mode: m = β1 m + β3 g, v = β2 v + (1−β2) g², u = m̂/(√v̂ + eps) + wd·θ;
       L2 mode: g += wd·θ first, then the same without the wd·θ term.
    4. stage 2: ‖θ‖ (taken before the update) and ‖u‖; step size lr·‖θ‖/‖u‖ if both are
       non-zero, else lr — only ``if use_nvlamb or weight_decay != 0``, else lr.
       θ ← θ − step size · u. No clamp of the ratio.
    """

    def __init__(
        self,
        groups,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.01,
        adam_w_mode=True,
        grad_averaging=True,
        max_grad_norm=1.0,
        use_nvlamb=False,
    ):
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
        )
        self.groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.max_grad_norm = max_grad_norm
        self.adam_w_mode = adam_w_mode
        self.use_nvlamb = use_nvlamb
        self.state: dict[int, dict] = {}

    def step(self, grads: list[list]) -> None:
        """grads[i][j]: the gradient of groups[i]["params"][j], or None. Params updated in place."""
        flat = [g.double() for gs in grads for g in gs if g is not None]
        global_grad_norm = torch.sqrt(sum((g * g).sum() for g in flat)).item() if flat else 0.0
        clip = global_grad_norm / self.max_grad_norm if global_grad_norm > self.max_grad_norm else 1.0
        for group, group_grads in zip(self.groups, grads):
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            b1, b2 = group["betas"]
            bc1, bc2 = (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)
            b3 = 1 - b1 if group["grad_averaging"] else 1.0
            wd, eps, lr = group["weight_decay"], group["eps"], group["lr"]
            for p, grad in zip(group["params"], group_grads):
                if grad is None:
                    continue
                st = self.state.setdefault(id(p), {})
                theta = p.detach().double()
                g = grad.double() / clip
                if not self.adam_w_mode:
                    g = g + wd * theta
                st["m"] = b1 * st.get("m", torch.zeros_like(theta)) + b3 * g
                st["v"] = b2 * st.get("v", torch.zeros_like(theta)) + (1 - b2) * g * g
                u = (st["m"] / bc1) / ((st["v"] / bc2).sqrt() + eps)
                if self.adam_w_mode:
                    u = u + wd * theta
                step_size = lr
                if self.use_nvlamb or wd != 0:
                    wn, un = theta.norm().item(), u.norm().item()
                    if wn != 0 and un != 0:
                        step_size = lr * (wn / un)
                with torch.no_grad():
                    p.copy_((theta - step_size * u).to(p.dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel_err(params_a, params_b) -> float:
    return max(rel_err(a.detach(), b.detach()) for a, b in zip(params_a, params_b))


def teacher_forced_updates(ref: ReferenceVR, names: list[str], befores: list[dict], samples_of, clip: float = 0.0):
    """The reference's update of every step, started from a run's weights at that step.

    ``ref`` holds float64 parameters in the order of ``names``; ``befores[s]``: {name: the run's
    weights before step s}; ``samples_of(s, before)``: {name: that step's k gradient samples, in
    the units whose sum is G}. DeepSpeed's ``gradient_clipping`` (max_norm / (‖G‖ + 1e-6) when
    < 1) is applied to G, not to the samples. Returns, per step, {name: Δθ}. The reference's own
    optimizer state evolves from its own G."""
    updates = []
    for step, before in enumerate(befores):
        with torch.no_grad():
            for name, p in zip(names, ref.params):
                p.copy_(before[name])
        samples = samples_of(step, before)
        samples = [[s.double() for s in samples[name]] for name in names]
        G = [sum(s) for s in samples]
        if clip:
            coef = clip / (torch.sqrt(sum((g * g).sum() for g in G)).item() + 1e-6)
            if coef < 1:
                G = [g * coef for g in G]
        ref.step(samples, G)
        updates.append({name: p.detach() - before[name].double() for name, p in zip(names, ref.params)})
    return updates


def update_error(before: torch.Tensor, after: torch.Tensor, ref_update: torch.Tensor) -> float:
    """Relative L2 error of a run's update (after − before) against the reference's, beyond the
    fp32 rounding of θ_after it is read from (4·2⁻²⁴·‖θ‖, which matters only for tiny updates)."""
    floor = 4 * 2.0**-24 * after.norm().item()
    diff = (after.double() - before.double() - ref_update).norm().item()
    return max(diff - floor, 0.0) / max(ref_update.norm().item(), 1e-30)
