"""The distillation objectives' losses on hand-computed cases: causal CD and DMD (causal ODE:
tests/test_ode_losses.py).

Each objective is built for real (its ``__init__`` reads tiny exports written here), then its
networks are replaced by stand-ins whose velocity is a closed-form function of their inputs, and
the noise draws are pinned, so every intermediate value -- and the loss -- can be written down by
hand below. A method that is wrong in a way a random DiT would hide (roles of two networks
swapped, a state paired with the wrong noise level, the wrong guidance form, a normaliser over
the wrong frames) changes these numbers.

Conventions (worldmodel/diffusion.py): x_sigma = (1 - sigma) x0 + sigma eps, x0 = x - sigma v.
"""

import torch

from tests.standins import StandIn, batch_of, context, pin_noise, write_export
from train.objectives.causal_cd import CausalCDConfig, CausalCDObjective
from train.objectives.dmd import DMDConfig, DMDObjective
from worldmodel import diffusion

# ----- causal consistency distillation --------------------------------------------------------
#
# Stand-ins (w = 3, grid N = 4 with shift 1: sigma = 1, .75, .5, .25, 0):
#   teacher  v = 0.5 x + 0.25 clean + [action given]  (so v_c - v_u = 1, and it must see clean = x0)
#   target   v = 2 x + sigma                          (EMA network, theta_T = 2)
#   student  v = 1 x + sigma                          (trainable, theta_S = 1)
# Different thetas make a student/target swap visible; the sigma term makes the noise level each
# network is called at visible.


def teacher_fn(theta, x, sigma, given, clean):
    assert clean is not None, "the teacher must see the ground-truth context (teacher forcing)"
    return 0.5 * x + 0.25 * clean + given


def affine_fn(theta, x, sigma, given, clean):
    return theta * x + sigma


def cd_objective(tmp_path, **cfg) -> CausalCDObjective:
    ar = write_export(tmp_path / "ar", "ar")
    obj = CausalCDObjective(CausalCDConfig(**{"grid_points": 4, "shift": 1.0, "guidance": 3.0, **cfg}),
                            context(tmp_path, ar))
    obj.teacher = StandIn(0.0, teacher_fn, trainable=False)
    obj.target = StandIn(2.0, affine_fn, trainable=False)
    obj.student = StandIn(1.0, affine_fn)
    return obj


def run_cd(obj, monkeypatch, n: int):
    """One CD loss with the pair index pinned to ``n``, x0 = 1 and eps = -1 everywhere."""
    highs = []

    def randint(low, high, size, **kw):  # sample_pair's draw: record the range, return n
        highs.append(high)
        return torch.full(size, n, dtype=torch.long)

    monkeypatch.setattr(torch, "randint", randint)
    pin_noise(monkeypatch, -1.0)
    x0 = torch.ones(2, 3, 1, 1, 2)
    loss, _ = obj.loss("student", batch_of(x0, torch.zeros(2, 3, dtype=torch.long)), 0, obj.networks())
    monkeypatch.undo()
    return loss, highs, x0


def test_cd_loss_on_a_hand_computed_interior_pair(tmp_path, monkeypatch):
    """Pair n = 1: the student at (x_t, sigma_t = .75), the target at the teacher's step (x_s, .5).

    x_t  = .25 * 1 + .75 * (-1)                       = -0.5
    v_c  = .5(-.5) + .25 + 1 = 1,  v_u = 0,  v_cfg = v_u + 3 (v_c - v_u) = 3   (standard CFG)
    x_s  = x_t + (.5 - .75) * 3                        = -1.25
    target x0  = x_s - .5 (2 x_s + .5)                 = -0.25
    student x0 = x_t - .75 (x_t + .75)                 = -0.6875
    loss = (-0.6875 + 0.25)^2                          = 0.19140625
    d loss / d theta_S = 2 (-0.4375) * (-sigma_t x_t = 0.375) = -0.328125
    Swapping student and target gives 0.31640625; the target at (x_t, sigma_t) 0.140625; the
    student at sigma_s 0.0625; the pair reversed (student at .5) another value again.
    """
    obj = cd_objective(tmp_path)
    loss, highs, x0 = run_cd(obj, monkeypatch, n=1)
    assert highs == [4]  # N pairs: the terminal pair (sigma_{N-1}, 0) is one of them
    torch.testing.assert_close(loss, torch.tensor(0.19140625), rtol=0, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(obj.student.theta.grad, torch.tensor(-0.328125), rtol=0, atol=1e-7)
    # the stop-gradient side: neither the target nor the teacher is called with grad enabled
    assert obj.target.theta.grad is None and obj.teacher.theta.grad is None
    assert [c["grad"] for c in obj.student.calls] == [True]
    assert all(not c["grad"] for c in obj.target.calls + obj.teacher.calls)
    # who sees which state at which level: student (x_t, .75); teacher cond + uncond at (x_t, .75);
    # target (x_s, .5); all with the ground-truth clean context, the teacher's uncond with null actions
    (s,), (t,) = obj.student.calls, obj.target.calls
    assert torch.all(s["sigma"] == 0.75) and torch.all(s["x"] == -0.5)
    assert torch.all(t["sigma"] == 0.5) and torch.all(t["x"] == -1.25)
    assert [bool(torch.all(c["sigma"] == 0.75)) for c in obj.teacher.calls] == [True, True]
    assert [bool(torch.all(c["actions"] >= 0)) for c in obj.teacher.calls] == [True, False]
    assert all(torch.equal(c["clean"], x0) for c in obj.student.calls + obj.target.calls + obj.teacher.calls)


def test_cd_target_updates_count_optimizer_steps_in_the_loop(tmp_path):
    from train.app import main as train_main
    from train.checkpoint import latest_checkpoint, load_checkpoint
    runs = tmp_path / "runs"
    common = ["data=synthetic", "model=tiny", f"runs_root={runs}", "progress=false", "device=cpu",
              "data.synthetic.episodes=4", "data.synthetic.episode_len=24", "data.batch_size=2"]
    assert train_main(["stage=tokenizer", "max_steps=1", *common]) == 0
    assert train_main(["stage=teacher", "max_steps=1", "stage.num_actions=4", *common]) == 0
    assert train_main(["stage=ar", "max_steps=1", "stage.num_actions=4", *common]) == 0
    assert train_main(["stage=causal_cd", "max_steps=3", "grad_accum=2", *common]) == 0
    ck = load_checkpoint(latest_checkpoint(runs / "causal_cd"))
    assert ck["objective"]["calls"] == 3 and ck["counts"]["student"] == 3  # not 6 loss calls


def test_cd_terminal_pair_target_is_the_teachers_step_to_zero(tmp_path, monkeypatch):
    """Pair n = 3: (sigma_t, sigma_s) = (.25, 0); the target is the Euler endpoint, no EMA call.

    x_t = .75 - .25 = 0.5;  v_c = .25 + .25 + 1 = 1.5, v_u = .5, v_cfg = .5 + 3 = 3.5
    x_s = .5 - .25 * 3.5 = -0.375 = target;  student x0 = .5 - .25 (.5 + .25) = 0.3125
    loss = 0.6875^2 = 0.47265625
    """
    obj = cd_objective(tmp_path)
    loss, _, _ = run_cd(obj, monkeypatch, n=3)
    torch.testing.assert_close(loss, torch.tensor(0.47265625), rtol=0, atol=1e-7)
    assert obj.target.calls == []


def test_cd_pairs_are_adjacent_grid_points(tmp_path):
    """sample_pair: sigma_s is the grid point right after sigma_t, one pair per clip, every pair
    drawn; without the terminal pair, sigma_s never reaches 0."""
    for terminal in (True, False):
        obj = cd_objective(tmp_path / str(terminal), shift=3.0, terminal_pair=terminal)
        grid = diffusion.grid(4, 3.0)
        t, s = obj.sample_pair(4000, torch.device("cpu"))
        assert t.shape == s.shape == (4000, 1)
        idx = (t == grid[None]).float().argmax(dim=1)
        assert torch.equal(s[:, 0], grid[idx + 1])
        assert sorted(set(idx.tolist())) == list(range(4 if terminal else 3))


def test_cd_target_is_an_ema_of_the_student(tmp_path, monkeypatch):
    """after_update: target <- mu target + (1 - mu) student, once per optimizer step; the loss
    leaves it alone (it used to move it on every call, i.e. per accumulation micro-step), and the
    student is not touched (a reversed lerp would move the student onto the target)."""
    obj = cd_objective(tmp_path, ema_decay=0.9)
    for _ in range(3):  # three accumulation micro-steps
        run_cd(obj, monkeypatch, n=1)
    assert obj.target.theta.item() == 2.0 and obj.student.theta.item() == 1.0
    obj.after_update("student")
    torch.testing.assert_close(obj.target.theta.detach(), torch.tensor(0.9 * 2.0 + 0.1 * 1.0))
    assert obj.student.theta.item() == 1.0 and obj.state_dict() == {"calls": 1}
    assert obj.export_weights({"student": "S", "target": "T"}) == "T"  # the stage ships the EMA


# ----- distribution matching distillation -----------------------------------------------------
#
# Pinned: the scores' noise level sigma = .5 (torch.rand -> .5, shift 1) and eps = 0, so
# x_t = x_hat / 2. Stand-ins (guidance g = 2, x0 form):
#   real   v = .5 x + [action given]  ->  x0_c = .75 x_t - .5, x0_u = .75 x_t
#          x0_real = x0_c + g (x0_c - x0_u) = .75 x_t - 1.5 = .375 x_hat - 1.5
#   critic v = theta_F x, theta_F = 1  ->  x0_fake = .5 x_t = .25 x_hat
# DMD gradient = (x0_fake - x0_real) / mean|x_hat - x0_real| = (1.5 - .125 x_hat) / norm.
# Per frame value of x_hat:  x_hat = 2: fake - real = 1.25, |x_hat - real| = 2.75
#                            x_hat = -2:  1.75, 0.25      x_hat = 10: 0.25, 7.75


def real_fn(theta, x, sigma, given, clean):
    assert clean is None, "the reference real score is the bidirectional teacher (no clean copy)"
    return 0.5 * x + given


def critic_fn(theta, x, sigma, given, clean):
    assert clean is None
    return theta * x


def dmd_objective(tmp_path, **cfg) -> DMDObjective:
    student = write_export(tmp_path / "cd", "causal_cd")
    teacher = write_export(tmp_path / "teacher", "teacher")
    obj = DMDObjective(DMDConfig(**{"teacher": str(teacher), "guidance": 2.0, "shift": 1.0, **cfg}),
                       context(tmp_path, student))
    obj.real = StandIn(0.0, real_fn, trainable=False)
    obj.critic = StandIn(1.0, critic_fn)
    return obj


def run_dmd(obj, monkeypatch, name: str, x_hat: torch.Tensor, mask: torch.Tensor):
    """One DMD loss for optimizer ``name`` on a rollout pinned to ``x_hat`` / ``mask``."""
    b, f = mask.shape
    actions = torch.zeros(b, f, dtype=torch.long)
    monkeypatch.setattr(obj, "rollout", lambda gen, batch, grad: (x_hat, mask, actions))
    monkeypatch.setattr(torch, "rand", lambda *size, **kw: torch.full(size, 0.5))
    pin_noise(monkeypatch, 0.0)
    loss, logs = obj.loss(name, batch_of(x_hat.detach(), actions), 0, obj.networks())
    monkeypatch.undo()
    return loss


def frames(values: list[list[float]]) -> torch.Tensor:
    """x_hat (B, F, 1, 1, 2), each frame constant; 2 elements per frame, so a normaliser that
    divides a sum by frames instead of elements shows."""
    return torch.tensor(values)[:, :, None, None, None].expand(-1, -1, 1, 1, 2).clone().requires_grad_(True)


def test_dmd_generator_gradient_on_a_hand_computed_case(tmp_path, monkeypatch):
    """x_hat = 2 everywhere, all frames generated: gradient 1.25 / 2.75 = 5/11 on every element,
    loss = 0.5 * (5/11)^2, d loss / d x_hat = (5/11) / numel (the stop-gradient target trick).
    Descent (-grad) moves x_hat toward the real x0 (-0.75) and away from the fake (0.5).
    With real and critic swapped the gradient is -1/6; with the normaliser on x0_fake 1.25/1.5;
    with the standard CFG form (u + g (c - u)) 2.25/2.25."""
    obj = dmd_objective(tmp_path)
    x_hat = frames([[2.0, 2.0], [2.0, 2.0]])
    loss = run_dmd(obj, monkeypatch, "generator", x_hat, torch.ones(2, 2, dtype=torch.bool))
    g = 5 / 11
    torch.testing.assert_close(loss, torch.tensor(0.5 * g * g, dtype=loss.dtype), rtol=1e-6, atol=0)
    loss.backward()
    torch.testing.assert_close(x_hat.grad, torch.full_like(x_hat, g / x_hat.numel()), rtol=1e-6, atol=0)
    # the scores are frozen evaluations: no grad in their calls, none reaching their parameters
    assert all(not c["grad"] for c in obj.real.calls + obj.critic.calls)
    assert obj.critic.theta.grad is None
    # real score: cond then uncond (null actions) at the same x_t = x_hat / 2, sigma = .5
    assert [bool(torch.all(c["actions"] >= 0)) for c in obj.real.calls] == [True, False]
    assert all(torch.all(c["x"] == 1.0) and torch.all(c["sigma"] == 0.5)
               for c in obj.real.calls + obj.critic.calls)


def test_dmd_masked_normaliser_is_per_sample_over_generated_frames(tmp_path, monkeypatch):
    """Sample 0: frame 0 is real context (x_hat = 10, masked out), frame 1 generated (2);
    sample 1: both generated (2, -2). Per-sample normalisers over the generated frames only:
      sample 0: 2.75                  -> gradient (0, 1.25 / 2.75)
      sample 1: (2.75 + 0.25) / 2 = 1.5 -> gradient (1.25 / 1.5, 1.75 / 1.5)
    A normaliser that included the context frame would be 5.25 for sample 0, one over the whole
    batch 3.375, one dividing by frames instead of elements 5.5; context frames get no gradient."""
    obj = dmd_objective(tmp_path)
    x_hat = frames([[10.0, 2.0], [2.0, -2.0]])
    mask = torch.tensor([[False, True], [True, True]])
    loss = run_dmd(obj, monkeypatch, "generator", x_hat, mask)
    grad = torch.tensor([[0.0, 1.25 / 2.75], [1.25 / 1.5, 1.75 / 1.5]])
    torch.testing.assert_close(loss, 0.5 * grad.pow(2).mean(), rtol=1e-6, atol=0)
    loss.backward()
    want = (grad / x_hat.numel())[:, :, None, None, None].expand_as(x_hat)
    torch.testing.assert_close(x_hat.grad, want, rtol=1e-6, atol=1e-12)


def test_dmd_teacher_ar_guidance_takes_the_direction_from_the_ar_model(tmp_path, monkeypatch):
    """real_score=teacher_ar_guidance: x0_real = x0_teacher(c) + g (x0_ar(c) - x0_ar(null)), the ar
    model seeing the rollout's frames clean. Guide v = .5 x + 2 [given] -> x0_ar(c) - x0_ar(u) =
    -sigma * 2 = -1; at x_hat = 2 (x_t = 1): x0_real = .25 + 2 (-1) = -1.75, x0_fake = .5,
    gradient = 2.25 / 3.75 = 0.6, loss = 0.18. The teacher's own uncond is not used."""
    obj = dmd_objective(tmp_path, real_score="teacher_ar_guidance",
                        ar=str(write_export(tmp_path / "ar", "ar")))

    def guide_fn(theta, x, sigma, given, clean):
        assert clean is not None, "the ar guide sees the rollout's frames clean"
        return 0.5 * x + 2.0 * given

    obj.guide = StandIn(0.0, guide_fn, trainable=False)
    x_hat = frames([[2.0, 2.0]])
    loss = run_dmd(obj, monkeypatch, "generator", x_hat, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor(0.18, dtype=loss.dtype), rtol=1e-6, atol=0)
    assert [bool(torch.all(c["actions"] >= 0)) for c in obj.guide.calls] == [True, False]
    assert all(torch.equal(c["clean"], x_hat.detach()) for c in obj.guide.calls)
    assert [bool(torch.all(c["actions"] >= 0)) for c in obj.real.calls] == [True]


def test_dmd_critic_loss_trains_the_fake_score_on_generated_frames(tmp_path, monkeypatch):
    """Critic update: v = theta_F x_t = x_hat / 2 against the flow target eps - x_hat = -x_hat:
    error (1.5 x_hat)^2 = 9 on each generated frame (x_hat = +-2); the context frame (x_hat = 10,
    error 225) is left out -> loss 9 (63 if it counted). d/d theta_F = mean 2 (1.5 x_hat)(x_hat/2)
    = 6. Only the critic is called; the real score takes no part."""
    obj = dmd_objective(tmp_path)
    x_hat = frames([[10.0, 2.0], [2.0, -2.0]]).detach()
    loss = run_dmd(obj, monkeypatch, "critic", x_hat, torch.tensor([[False, True], [True, True]]))
    torch.testing.assert_close(loss, torch.tensor(9.0), rtol=1e-6, atol=0)
    loss.backward()
    torch.testing.assert_close(obj.critic.theta.grad, torch.tensor(6.0), rtol=1e-6, atol=0)
    assert obj.real.calls == [] and [c["grad"] for c in obj.critic.calls] == [True]



def test_dmd_scores_judge_a_rollout_from_noise_under_its_null_first_action(tmp_path, monkeypatch):
    """A rollout started from noise makes frame 0 with the null action (no action came before
    it); the real score, its guidance and the critic must be given that same null action, not
    the clip's recorded one, or they judge the frame under an action it was not made with."""
    obj = dmd_objective(tmp_path, context_prob=0.0)
    made_with = []
    monkeypatch.setattr("train.objectives.dmd.self_rollout",
                        lambda gen, actions, *a, **kw: made_with.append(actions.clone())
                        or torch.zeros(actions.shape + (1, 1, 2)))
    obj.ctx.shared_randint = lambda low, high: 0
    batch = batch_of(torch.zeros(2, 3, 1, 1, 2), torch.ones(2, 3, dtype=torch.long))
    for name in ("generator", "critic"):
        obj.loss(name, batch, 0, obj.networks())
    assert all(bool((a[:, 0] == -1).all() and (a[:, 1:] == 1).all()) for a in made_with)
    for call in obj.real.calls[::2] + obj.critic.calls:  # conditioned calls (every other real call is the null)
        assert bool((call["actions"][:, 0] == -1).all() and (call["actions"][:, 1:] == 1).all()), call["actions"]
