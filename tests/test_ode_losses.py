"""Causal ODE distillation's losses on hand-computed cases (conventions and method: the docstring
of tests/test_method_losses.py)."""

import torch

from tests.standins import StandIn, batch_of, context, pin_noise, write_export
from train.objectives.causal_ode import CausalODEConfig, CausalODEObjective
from worldmodel import diffusion

# ----- causal ODE distillation ----------------------------------------------------------------
#
# Teacher stand-in v = clean * [given]: v_c = x0 (the clip's ground truth), v_u = 0, so with
# guidance w = 2 the guided velocity is the constant 2 x0 and the Euler ODE from eps = 0.5 is a
# straight line: state(sigma) = 0.5 - (1 - sigma) * 2 x0, endpoint 0.5 - 2 x0. With N = 8 and
# shift 1 the grid is 1, .875, ..., .125, 0 and the stored states are those at grid points 0, 2,
# 4, 6: sigma 1, .75, .5, .25, the 4-step list. All values are exact in the store's float16.

ODE_X0 = [0.5, 1.0, -0.5, 0.25]  # per clip, every element


def ode_objective(tmp_path, monkeypatch, student_fn) -> tuple[CausalODEObjective, torch.Tensor]:
    ar = write_export(tmp_path / "ar", "ar")
    obj = CausalODEObjective(CausalODEConfig(grid_points=8, shift=1.0, guidance=2.0, trajectories=4),
                             context(tmp_path, ar))

    def ode_teacher(theta, x, sigma, given, clean):
        return clean * given

    obj.teacher = StandIn(0.0, ode_teacher, trainable=False)
    obj.student = StandIn(1.0, student_fn)
    x0 = torch.tensor(ODE_X0)[:, None, None, None, None].expand(4, 2, 1, 1, 2).clone()
    pin_noise(monkeypatch, 0.5)
    obj.generate(x0, torch.zeros(4, 2, dtype=torch.long))
    monkeypatch.undo()
    return obj, x0


def exact_student(theta, x, sigma, given, clean):
    """theta * the teacher's guided velocity: theta = 1 predicts the ODE endpoint exactly."""
    return theta * 2.0 * clean * given


def pinned_draws(monkeypatch, idx: list[int], k: list[int]) -> None:
    """The loss's two draws, in order: which stored clips, which stored state of each."""
    draws = [torch.tensor(idx), torch.tensor(k)]
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: draws.pop(0))


def test_ode_store_pairs_each_state_with_its_grid_time(tmp_path, monkeypatch):
    """store["states"][:, k] is the trajectory AT sigma_k of the 4-step list (not the state after
    the step, not grid points 0..3), the endpoint is the ODE's end, each next to its own clip."""
    obj, x0 = ode_objective(tmp_path, monkeypatch, exact_student)
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(obj.grid[torch.tensor(obj.keep)], sig)
    torch.testing.assert_close(obj.grid[torch.tensor(obj.keep)], diffusion.step_list(4, 1.0))
    want = 0.5 - (1 - sig)[None, :, None, None, None, None] * 2 * x0[:, None]  # (clips, 4, F, h, w, c)
    torch.testing.assert_close(obj.store["states"].float(), want, atol=1e-3, rtol=0)
    torch.testing.assert_close(obj.store["endpoint"].float(), 0.5 - 2 * x0, atol=1e-3, rtol=0)
    assert torch.equal(obj.store["gt"].float(), x0)


def test_ode_loss_pairs_state_and_sigma(tmp_path, monkeypatch):
    """A student equal to the guided teacher velocity maps every stored state, at ITS sigma, onto
    the endpoint: loss 0. A state paired with the next level is off by .25 * 2 x0 -> loss > 0.
    Every call: state = 0.5 - (1 - sigma) 2 clean, with sigma in the 4-step list."""
    obj, _ = ode_objective(tmp_path, monkeypatch, exact_student)
    pinned_draws(monkeypatch, idx=[2, 0, 3, 1], k=[0, 1, 2, 3])
    loss, _ = obj.loss("student", batch_of(torch.zeros(4, 2, 1, 1, 2), torch.zeros(4, 2, dtype=torch.long)),
                       0, obj.networks())
    assert loss.item() < 1e-10
    (call,) = obj.student.calls
    torch.testing.assert_close(call["sigma"], torch.tensor([[1.0] * 2, [0.75] * 2, [0.5] * 2, [0.25] * 2]))
    sigma = call["sigma"][:, :, None, None, None]
    torch.testing.assert_close(call["x"], 0.5 - (1 - sigma) * 2 * call["clean"], atol=1e-3, rtol=0)
    torch.testing.assert_close(call["clean"][:, 0, 0, 0, 0], torch.tensor([-0.5, 0.5, 0.25, 1.0]))


def test_ode_loss_regresses_onto_the_endpoint_by_hand(tmp_path, monkeypatch):
    """theta = 0.5: x0_hat = state - sigma gt = endpoint + sigma gt, so the per-row error is
    sigma * gt: rows (clip 2, sigma 1), (clip 0, .75), (clip 3, .5), (clip 1, .25) give
    (-.5)^2, .375^2, .125^2, .25^2 -> loss = 0.46875 / 4 = 0.1171875."""
    obj, _ = ode_objective(tmp_path, monkeypatch, exact_student)
    obj.student.theta.data.fill_(0.5)
    pinned_draws(monkeypatch, idx=[2, 0, 3, 1], k=[0, 1, 2, 3])
    loss, _ = obj.loss("student", batch_of(torch.zeros(4, 2, 1, 1, 2), torch.zeros(4, 2, dtype=torch.long)),
                       0, obj.networks())
    torch.testing.assert_close(loss, torch.tensor(0.1171875), atol=1e-6, rtol=0)



def test_ode_trajectories_are_made_and_kept_in_fp32_under_bf16_training(tmp_path, monkeypatch):
    """Stage training may run under bf16 autocast; the ODE targets must not: the teacher sees fp32
    inputs (autocast off) and the store keeps fp32, so the endpoint a student regresses onto is
    exact to fp32."""
    dtypes = []

    def teacher(theta, x, sigma, given, clean):
        dtypes.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return clean * given

    obj, _ = ode_objective(tmp_path, monkeypatch, exact_student)
    obj.teacher = StandIn(0.0, teacher, trainable=False)
    obj.store = {}
    x0 = torch.full((1, 2, 1, 1, 2), 0.3)
    pin_noise(monkeypatch, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        obj.generate(x0.to(torch.bfloat16), torch.zeros(1, 2, dtype=torch.long))
    assert dtypes and all(d == (torch.float32, False) for d in dtypes)
    assert all(v.dtype in (torch.float32, torch.long) for v in obj.store.values())
    torch.testing.assert_close(obj.store["endpoint"], 0.5 - 2 * x0.to(torch.bfloat16).float(), atol=1e-7, rtol=0)
