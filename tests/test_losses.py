"""pipeline.objective.losses against an independent plain-`math` reference of docs/losses.md.

Values are compared directly; Jacobians w.r.t. the policy's chosen/rejected log-probs are compared
with central finite differences of the reference (float64, h = 1e-6).
"""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from pipeline.config.loss_options import F_DIVERGENCE_TYPES, LOSS_OPTIONS, SETTING_NAMES, check_loss_options
from pipeline.core.errors import PipelineError
from pipeline.objective.losses import (
    F_DIVERGENCES,
    FUNCTIONS,
    LOSS_TYPES,
    LossSettings,
    PairLogps,
    Scores,
    dpo_objective,
    f_divergence_score,
    rewards,
)
from pipeline.objective.losses import pair_losses as loss_terms

LOSSES_MD = Path(__file__).parents[1] / "docs" / "losses.md"


def preference_loss(loss_type, logps, settings):
    """(per-pair losses ℓ_i, chosen rewards βρ⁺, rejected rewards βρ⁻) of one loss type, as dpo_objective
    computes them for each of its types."""
    x = Scores.of(logps, settings)
    return loss_terms(loss_type, x, settings), *rewards(x, settings)


def test_the_objective_and_the_option_table_name_the_same_losses_and_settings():
    assert list(FUNCTIONS) == list(LOSS_OPTIONS) == list(LOSS_TYPES)
    assert tuple(f.name for f in dataclasses.fields(LossSettings)) == SETTING_NAMES
    assert tuple(F_DIVERGENCES) == F_DIVERGENCE_TYPES


H = 1e-6
GRAD_TOL = dict(rtol=1e-6, atol=1e-6)
VALUE_TOL = dict(rtol=1e-10, atol=1e-12)

# Four pairs: ρ⁺ = [-0.3, 0.4, -0.9, 0.5], ρ⁻ = [-0.9, 0.7, -1.2, 0.2], so Δ has both signs;
# L = c − r and L_ref have no ties. Lengths include 1 and 0 (floored at 1).
C = [-12.3, -8.1, -20.0, -5.5]
R = [-14.0, -7.5, -25.2, -4.8]
CR = [-12.0, -8.5, -19.1, -6.0]
RR = [-13.1, -8.2, -24.0, -5.0]
LC = [3, 1, 0, 7]
LR = [5, 0, 2, 1]
SFT = 2.3


# ---------------------------------------------------------------- plain reference (floats, per pair)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
    return math.log(1.0 / (1.0 + math.exp(-x)))


def ref_g(rho, f_type, a):
    if f_type == "reverse_kl":
        return rho
    if f_type == "forward_kl":
        return -math.exp(-rho)
    if f_type == "js_divergence":
        return logsig(rho)
    if f_type == "alpha_divergence":
        return rho if a == 1 else math.exp(min((a - 1) * rho, 80.0)) / (a - 1)
    raise AssertionError(f_type)


def ref_losses(
    loss_type,
    c,
    r,
    cr,
    rr,
    *,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    chosen_lengths=None,
    rejected_lengths=None,
    sft_nll=None,
):
    eps, tau = label_smoothing, discopop_tau
    n = len(c)
    rp = [c[i] - cr[i] for i in range(n)]
    rn = [r[i] - rr[i] for i in range(n)]
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            a = sorted(c[i] - r[i] for i in range(n))
            b = sorted(cr[i] - rr[i] for i in range(n))
        else:
            a, b = sorted(rp), sorted(rn)
        return [-(1 - eps) * logsig(beta * (x - y)) - eps * logsig(-beta * (x - y)) for x, y in zip(a, b)]

    out = []
    for i in range(n):
        p = ref_g(rp[i], f_divergence_type, f_alpha_divergence_coef)
        m = ref_g(rn[i], f_divergence_type, f_alpha_divergence_coef)
        z = beta * (p - m)
        if chosen_lengths is not None:
            lp, lm = max(chosen_lengths[i], 1), max(rejected_lengths[i], 1)
        if loss_type == "sigmoid":
            v = -logsig(z)
        elif loss_type == "hinge":
            v = max(0.0, 1.0 - z)
        elif loss_type == "ipo":
            v = (p / lp - m / lm - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "exo_pair":
            q_pos, q_neg = sig(z), sig(-z)
            v = q_pos * math.log(q_pos / (1 - eps)) + q_neg * math.log(q_neg / eps)
        elif loss_type == "nca_pair":
            v = -logsig(beta * p) - 0.5 * logsig(-beta * p) - 0.5 * logsig(-beta * m)
        elif loss_type == "robust":
            v = ((eps - 1) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            v = -logsig(beta * p) - logsig(-beta * m)
        elif loss_type == "sppo_hard":
            v = (p - 0.5 / beta) ** 2 + (m + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            v = 1 - sig(beta * rp[i]) + sig(beta * rn[i])
        elif loss_type == "apo_down":
            v = sig(beta * rp[i]) + 1 - sig(z)
        elif loss_type == "discopop":
            mix = sig(z / tau)
            v = (1 - mix) * -logsig(z) + mix * math.exp(-z)
        elif loss_type == "sft":
            v = sft_nll
        elif loss_type == "sigmoid_norm":
            v = -logsig(beta * (p / lp - m / lm))
        else:
            raise AssertionError(loss_type)
        out.append(v)
    return out


def fd_jacobian(fn, x, h=H):
    """J[i][j] = ∂fn(x)_i / ∂x_j by central differences."""
    cols = []
    for j in range(len(x)):
        up, down = list(x), list(x)
        up[j] += h
        down[j] -= h
        cols.append([(a - b) / (2 * h) for a, b in zip(fn(up), fn(down))])
    return torch.tensor(cols, dtype=torch.float64).T


# ---------------------------------------------------------------- helpers


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def settings(
    beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05
):
    """LossSettings with the reference's keyword defaults (these tests' values, not DPOConfig's)."""
    return LossSettings(beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau)


def pair_losses(loss_type, c, r, cr, rr, *, chosen_lengths=None, rejected_lengths=None, sft_nll=None, **kw):
    """ℓ_i of `preference_loss`, called with the reference's argument shape."""
    logps = PairLogps(c, r, cr, rr, chosen_lengths, rejected_lengths, sft_nll)
    return preference_loss(loss_type, logps, settings(**kw))[0]


def torch_kwargs(kw):
    """Reference kwargs → pair_losses kwargs (lengths and sft_nll as tensors)."""
    out = dict(kw)
    for key in ("chosen_lengths", "rejected_lengths"):
        if out.get(key) is not None:
            out[key] = torch.tensor(out[key])  # int64, as the collator produces
    if out.get("sft_nll") is not None:
        out["sft_nll"] = t64(out["sft_nll"])
    return out


def check_value_and_grad(loss_type, c=C, r=R, cr=CR, rr=RR, **kw):
    tkw = torch_kwargs(kw)

    def f(ct, rt):
        return pair_losses(loss_type, ct, rt, t64(cr), t64(rr), **tkw)

    got = f(t64(c), t64(r))
    torch.testing.assert_close(got, t64(ref_losses(loss_type, c, r, cr, rr, **kw)), **VALUE_TOL)

    jac_c, jac_r = torch.autograd.functional.jacobian(f, (t64(c), t64(r)))
    fd_c = fd_jacobian(lambda x: ref_losses(loss_type, x, r, cr, rr, **kw), c)
    fd_r = fd_jacobian(lambda x: ref_losses(loss_type, c, x, cr, rr, **kw), r)
    torch.testing.assert_close(jac_c, fd_c, **GRAD_TOL)
    torch.testing.assert_close(jac_r, fd_r, **GRAD_TOL)


def default_kwargs(beta, **extra):
    return dict(beta=beta, label_smoothing=0.1, chosen_lengths=LC, rejected_lengths=LR, sft_nll=SFT, **extra)


# ---------------------------------------------------------------- every loss × every divergence


def test_public_names():
    assert tuple(LOSS_TYPES) == (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    )
    assert tuple(F_DIVERGENCES) == ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def test_registry_names_are_the_rows_of_losses_md_in_order():
    text = LOSSES_MD.read_text(encoding="utf-8")
    section = text.split("## Loss types", 1)[1].split("\n#", 1)[0]
    header, *rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert header == "loss_type" and list(LOSS_TYPES) == rows
    f_section = text.split("### f-divergence transform", 1)[1].split("\n#", 1)[0]
    header, *rows = re.findall(r"^\| `(\w+)`", f_section, flags=re.M)
    assert header == "f_divergence_type" and list(F_DIVERGENCES) == rows


@pytest.mark.parametrize("beta", [0.1, 1.5])
@pytest.mark.parametrize("f_type", list(F_DIVERGENCES))
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_loss_value_and_gradient(loss_type, f_type, beta):
    check_value_and_grad(loss_type, **default_kwargs(beta, f_divergence_type=f_type))


@pytest.mark.parametrize("tau", [0.05, 1.3])
def test_discopop_tau(tau):
    check_value_and_grad("discopop", beta=0.8, discopop_tau=tau)


def test_discopop_very_negative_margin_is_finite():
    # z = βΔ = −2000: σ(z/τ) underflows to 0 while exp(−z) overflows; the loss must stay ≈ −log σ(z).
    c = t64([0.0]).requires_grad_()
    loss = pair_losses("discopop", c, t64([2000.0]), t64([0.0]), t64([0.0]), beta=1.0)
    loss.sum().backward()
    torch.testing.assert_close(loss, t64([2000.0]))
    assert torch.isfinite(c.grad).all()


@pytest.mark.parametrize("f_type", list(F_DIVERGENCES))
def test_f_divergence_score_value_and_gradient(f_type):
    rho = [-2.0, -0.3, 0.0, 0.7, 3.0]
    x = t64(rho).requires_grad_()
    got = f_divergence_score(x, f_type, 0.3)
    torch.testing.assert_close(got, t64([ref_g(v, f_type, 0.3) for v in rho]), **VALUE_TOL)
    (grad,) = torch.autograd.grad(got.sum(), x)
    fd = [(ref_g(v + H, f_type, 0.3) - ref_g(v - H, f_type, 0.3)) / (2 * H) for v in rho]
    torch.testing.assert_close(grad, t64(fd), **GRAD_TOL)


# ---------------------------------------------------------------- edge values


@pytest.mark.parametrize("eps", [1e-6, 0.999])
@pytest.mark.parametrize("beta", [0.1, 1.5])
def test_exo_pair_epsilon_bounds(eps, beta):
    check_value_and_grad("exo_pair", beta=beta, label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 0.499])
@pytest.mark.parametrize("beta", [0.1, 1.5])
def test_robust_epsilon_bounds(eps, beta):
    check_value_and_grad("robust", beta=beta, label_smoothing=eps)


def test_robust_with_zero_epsilon_is_sigmoid():
    args = (t64(C), t64(R), t64(CR), t64(RR))
    torch.testing.assert_close(pair_losses("robust", *args, label_smoothing=0.0), pair_losses("sigmoid", *args))


@pytest.mark.parametrize("loss_type,eps", [("exo_pair", 0.0), ("exo_pair", 1.0), ("robust", 0.5), ("robust", -0.1)])
def test_label_smoothing_out_of_range_raises(loss_type, eps):
    # refused by the one home of the rules, and so by the objective that consults it
    with pytest.raises(ValueError, match=f"'{loss_type}' needs .*label_smoothing"):
        check_loss_options({**OPTIONS, "loss_type": [loss_type], "label_smoothing": eps})
    with pytest.raises(ValueError, match=f"'{loss_type}' needs .*label_smoothing"):
        dpo_objective([loss_type], None, tensor_batch(), settings(label_smoothing=eps))


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_aot_label_smoothing(eps):
    for loss_type in ("aot", "aot_unpaired"):
        check_value_and_grad(loss_type, beta=0.5, label_smoothing=eps)


def test_alpha_divergence_coef_one_is_identity():
    rho = t64([-3.0, 0.0, 0.5, 200.0])
    torch.testing.assert_close(f_divergence_score(rho, "alpha_divergence", 1.0), rho, rtol=0, atol=0)
    check_value_and_grad("sigmoid", beta=0.7, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    args = (t64(C), t64(R), t64(CR), t64(RR))
    torch.testing.assert_close(
        pair_losses("sigmoid", *args, beta=0.7, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
        pair_losses("sigmoid", *args, beta=0.7, f_divergence_type="reverse_kl"),
        rtol=0,
        atol=0,
    )


def test_alpha_divergence_exponent_clamp_by_dtype():
    # a = 2: exponent (a−1)·ρ = ρ, so the clamp shows directly: 11 in float16, 80 otherwise.
    rho = [20.0, 100.0, 0.0, -1.0]
    half = f_divergence_score(torch.tensor(rho, dtype=torch.float16), "alpha_divergence", 2.0)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half, torch.tensor([math.exp(11), math.exp(11), 1.0, math.exp(-1)], dtype=torch.float16))
    for dtype in (torch.float32, torch.bfloat16):
        got = f_divergence_score(torch.tensor(rho, dtype=dtype), "alpha_divergence", 2.0)
        want = torch.tensor([math.exp(20), math.exp(80), 1.0, math.exp(-1)], dtype=dtype)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    # a = 0.5: exponent −ρ/2; ρ = −400 would give exp(200) = inf in float32 without the clamp.
    got = f_divergence_score(torch.tensor([-400.0], dtype=torch.float32), "alpha_divergence", 0.5)
    torch.testing.assert_close(got, torch.tensor([math.exp(80) / -0.5], dtype=torch.float32))


def test_unknown_f_divergence_raises():
    with pytest.raises(ValueError, match="unknown f_divergence_type 'tv'"):
        f_divergence_score(t64([0.0]), "tv", 0.5)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_lengths_floored_at_one(loss_type):
    args = (t64(C), t64(R), t64(CR), t64(RR))
    zeros = pair_losses(
        loss_type,
        *args,
        chosen_lengths=torch.zeros(4, dtype=torch.long),
        rejected_lengths=torch.zeros(4, dtype=torch.long),
    )
    ones = pair_losses(loss_type, *args, chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(4))
    torch.testing.assert_close(zeros, ones, rtol=0, atol=0)
    # length 1 means no normalisation: ipo becomes (Δ − 1/(2β))², sigmoid_norm becomes sigmoid.
    check_value_and_grad(loss_type, beta=0.4, chosen_lengths=[1, 1, 1, 1], rejected_lengths=[0, 1, 0, 1])
    if loss_type == "sigmoid_norm":
        torch.testing.assert_close(ones, pair_losses("sigmoid", *args))


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_missing_lengths_raise(loss_type):
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        pair_losses(loss_type, t64(C), t64(R), t64(CR), t64(RR))


def test_sft_broadcasts_and_requires_nll():
    nll = t64(SFT).requires_grad_()
    got = pair_losses("sft", t64(C), t64(R), t64(CR), t64(RR), sft_nll=nll)
    torch.testing.assert_close(got, t64([SFT] * 4))
    (grad,) = torch.autograd.grad(got.mean(), nll)
    torch.testing.assert_close(grad, t64(1.0))
    with pytest.raises(ValueError, match="'sft' needs sft_nll"):
        pair_losses("sft", t64(C), t64(R), t64(CR), t64(RR))


# Ties: aot has L = c − r = [1.0, 0.5, 1.0, −0.2] (indices 0 and 2 tied, their sorted partners in
# L_ref differ); aot_unpaired has ρ⁺ = [0.5, 0.0, 0.5, 1.0] tied the same way. At a tie the sum of
# losses is only differentiable along moves that keep the tie, so the tied group's gradient is
# checked as a sum (direction e_0 + e_2) and the other entries one by one.
TIES = {
    "aot": dict(
        c=[1.0, 2.0, 3.0, 4.0],
        r=[0.0, 1.5, 2.0, 4.2],
        cr=[0.5, 0.5, 0.0, 1.0],
        rr=[0.2, 0.2, 0.1, 0.2],
        groups_c=[[0, 2], [1], [3]],
        groups_r=[[0, 2], [1], [3]],
    ),
    "aot_unpaired": dict(
        c=[1.0, 2.0, 3.0, 4.0],
        r=[0.0] * 4,
        cr=[0.5, 2.0, 2.5, 3.0],
        rr=[0.3, -0.2, 0.6, 0.1],
        groups_c=[[0, 2], [1], [3]],
        groups_r=[[0], [1], [2], [3]],
    ),
}


@pytest.mark.parametrize("loss_type", list(TIES))
def test_aot_ties(loss_type):
    d = TIES[loss_type]
    kw = dict(beta=0.9, label_smoothing=0.2)
    c, r = t64(d["c"]).requires_grad_(), t64(d["r"]).requires_grad_()
    got = pair_losses(loss_type, c, r, t64(d["cr"]), t64(d["rr"]), **kw)
    torch.testing.assert_close(got, t64(ref_losses(loss_type, d["c"], d["r"], d["cr"], d["rr"], **kw)), **VALUE_TOL)
    grad_c, grad_r = torch.autograd.grad(got.sum(), (c, r))

    def total(cc, rr_):
        return sum(ref_losses(loss_type, cc, rr_, d["cr"], d["rr"], **kw))

    for which, grad, groups in (("c", grad_c, d["groups_c"]), ("r", grad_r, d["groups_r"])):
        for group in groups:

            def shifted(h):
                x = list(d[which])
                for j in group:
                    x[j] += h
                return total(x, d["r"]) if which == "c" else total(d["c"], x)

            fd = (shifted(H) - shifted(-H)) / (2 * H)
            assert grad[group].sum().item() == pytest.approx(fd, rel=1e-6, abs=1e-6), (which, group)


# ---------------------------------------------------------------- objective and rewards


def tensor_batch(chosen=None, **extra):
    return PairLogps(t64(C) if chosen is None else chosen, t64(R), t64(CR), t64(RR), **extra)


def ref_mean(loss_type, weights=None, **kw):
    losses = ref_losses(loss_type, C, R, CR, RR, **kw)
    weights = weights or [1.0] * len(losses)
    return sum(w * v for w, v in zip(weights, losses)) / len(losses)


def test_mpo_combination_is_weighted_sum():
    total, terms, _, _ = dpo_objective(
        ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], tensor_batch(sft_nll=t64(SFT)), settings(beta=0.1)
    )
    parts = {t: ref_mean(t, beta=0.1, sft_nll=SFT) for t in ("sigmoid", "bco_pair", "sft")}
    assert set(terms) == set(parts)
    for name, value in parts.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-12)
    want = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + 1.0 * parts["sft"]
    assert total.item() == pytest.approx(want, rel=1e-12)


def test_pair_weights_multiply_before_mean_and_gradient():
    w = [0.5, 1.2, 0.0, 2.0]
    kw = dict(beta=0.3, chosen_lengths=LC, rejected_lengths=LR)
    types, loss_weights = ["sigmoid", "ipo"], [1.0, 0.5]

    def ref_total(c):
        return sum(
            lw * sum(pw * v for pw, v in zip(w, ref_losses(t, c, R, CR, RR, **kw))) / len(w)
            for t, lw in zip(types, loss_weights)
        )

    chosen = t64(C).requires_grad_()
    tkw = torch_kwargs(kw)
    batch = tensor_batch(chosen, chosen_lengths=tkw.pop("chosen_lengths"), rejected_lengths=tkw.pop("rejected_lengths"))
    total, terms, _, _ = dpo_objective(types, loss_weights, batch, settings(**tkw), pair_weights=t64(w))
    assert total.item() == pytest.approx(ref_total(C), rel=1e-12)
    assert terms["ipo"].item() == pytest.approx(ref_mean("ipo", w, **kw), rel=1e-12)
    (grad,) = torch.autograd.grad(total, chosen)
    fd = fd_jacobian(lambda c: [ref_total(c)], C)[0]
    torch.testing.assert_close(grad, fd, **GRAD_TOL)


def test_single_string_and_default_weights():
    total, terms, _, _ = dpo_objective("hinge", None, tensor_batch(), settings(beta=1.5))
    assert list(terms) == ["hinge"]
    assert total.item() == pytest.approx(ref_mean("hinge", beta=1.5), rel=1e-12)
    total2, _, _, _ = dpo_objective(["sigmoid", "hinge"], None, tensor_batch(), settings(beta=1.5))
    assert total2.item() == pytest.approx(ref_mean("sigmoid", beta=1.5) + ref_mean("hinge", beta=1.5), rel=1e-12)


@pytest.mark.parametrize(
    "types,weights,pair_weights,message",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2], None, "loss_weights has 2 entries but loss_type has 3"),
        (["sigmoid", "nope"], None, None, "unknown loss_type.*'nope'"),
        ([], None, None, "loss_type is empty"),
        (["aot"], None, t64([1.0] * 4), "not supported with loss_type 'aot'.*sorted rank"),
    ],
)
def test_objective_rejects_bad_arguments(types, weights, pair_weights, message):
    with pytest.raises(ValueError, match=message):
        dpo_objective(types, weights, tensor_batch(sft_nll=t64(SFT)), settings(), pair_weights=pair_weights)


def test_unknown_loss_type_in_pair_losses_raises():
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        pair_losses("dpo", t64(C), t64(R), t64(CR), t64(RR))


@pytest.mark.parametrize("f_type", ["reverse_kl", "forward_kl"])
def test_rewards_are_raw_and_detached(f_type):
    chosen = t64(C).requires_grad_()
    o = settings(beta=0.5, f_divergence_type=f_type)
    losses, pos, neg = preference_loss("sigmoid", tensor_batch(chosen), o)
    torch.testing.assert_close(pos, t64([0.5 * (c - cr) for c, cr in zip(C, CR)]))
    torch.testing.assert_close(neg, t64([0.5 * (r - rr) for r, rr in zip(R, RR)]))
    assert not pos.requires_grad and not neg.requires_grad
    assert losses.requires_grad
    _, _, pos2, neg2 = dpo_objective(["sigmoid", "hinge"], None, tensor_batch(chosen), o)
    torch.testing.assert_close(pos2, pos, rtol=0, atol=0)
    torch.testing.assert_close(neg2, neg, rtol=0, atol=0)
    assert not pos2.requires_grad and not neg2.requires_grad


# ---------------------------------------------------------------- the registry's own metadata and rules

# Every LossSettings field, as check_loss_options receives it from a complete DPOConfig.
OPTIONS = dataclasses.asdict(settings())


def test_each_loss_type_reads_only_its_declared_settings():
    setting_names = {f.name for f in dataclasses.fields(LossSettings)}
    base = settings(
        beta=0.4,
        label_smoothing=0.1,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.5,
        discopop_tau=0.05,
    )
    changed = dict(
        beta=1.5, label_smoothing=0.3, f_divergence_type="js_divergence", f_alpha_divergence_coef=0.3, discopop_tau=1.3
    )
    assert set(changed) == setting_names
    batch = tensor_batch(chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR), sft_nll=t64(SFT))
    for loss_type, row in LOSS_TYPES.items():
        assert set(row.settings) <= setting_names, loss_type
        assert set(row.needs) <= {"lengths", "sft_nll"}, loss_type
        assert "arXiv" in row.paper, loss_type
        want = preference_loss(loss_type, batch, base)[0]
        for key, value in changed.items():
            got = preference_loss(loss_type, batch, dataclasses.replace(base, **{key: value}))[0]
            assert torch.equal(got, want) == (key not in row.settings), (loss_type, key)


@pytest.mark.parametrize("eps", [1.0, 0.0, -0.5, 1.5])
def test_check_loss_options_refuses_exo_pair_outside_open_unit_interval(eps):
    with pytest.raises(PipelineError, match=r"'exo_pair' needs label_smoothing > 0 and < 1 .*1e-3"):
        check_loss_options({**OPTIONS, "loss_type": ["exo_pair"], "label_smoothing": eps})


def test_check_loss_options_accepts_exo_pair_with_the_recommended_epsilon():
    check_loss_options({**OPTIONS, "loss_type": ["exo_pair"], "label_smoothing": 1e-3})
    check_loss_options({**OPTIONS, "loss_type": "exo_pair", "label_smoothing": 0.999})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"loss_weights has 1 entries but loss_type has 2"),
        ({"loss_type": ["dpo"]}, r"unknown loss_type \['dpo'\]"),
        ({"loss_type": []}, r"loss_type is empty"),
        ({"f_divergence_type": "kl"}, r"unknown f_divergence_type 'kl'"),
        ({"loss_type": ["exo_pair"]}, r"'exo_pair' needs label_smoothing > 0.*1e-3"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, r"'robust' needs label_smoothing in \[0, 0.5\)"),
        ({"use_weighting": True, "loss_type": ["aot"]}, r"use_weighting=True is not supported with loss_type 'aot'"),
        ({"use_weighting": True, "loss_type": ["sigmoid", "aot_unpaired"]}, r"use_weighting=True is not supported"),
    ],
)
def test_check_loss_options_refusals(options, message):
    with pytest.raises(PipelineError, match=message):
        check_loss_options({**OPTIONS, "loss_type": ["sigmoid"], **options})


def test_check_loss_options_names_options_through_name():
    train = lambda key: f"train.{key}"  # noqa: E731
    with pytest.raises(PipelineError, match=r"^train\.loss_type 'exo_pair' needs train\.label_smoothing > 0"):
        check_loss_options({**OPTIONS, "loss_type": ["exo_pair"], "label_smoothing": 1.0}, name=train)
    use_weighting = r"^train\.use_weighting=True .* train\.loss_type 'aot'.* train\.use_weighting"
    with pytest.raises(PipelineError, match=use_weighting):
        check_loss_options({**OPTIONS, "loss_type": ["aot"], "use_weighting": True}, name=train)
    with pytest.raises(PipelineError, match=r"^unknown train\.f_divergence_type 'kl'"):
        check_loss_options({"f_divergence_type": "kl"}, name=train)


def test_check_loss_options_accepts_every_loss_and_skips_rules_whose_options_are_missing():
    for loss_type in LOSS_TYPES:
        check_loss_options({**OPTIONS, "loss_type": [loss_type], "label_smoothing": 0.1})
    check_loss_options({**OPTIONS, "loss_type": list(LOSS_TYPES), "label_smoothing": 0.1, "loss_weights": [1.0] * 15})
    check_loss_options({"loss_type": ["exo_pair"]})  # label_smoothing missing: its default is the caller's to supply
    check_loss_options({})
