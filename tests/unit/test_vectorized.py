"""Vectorized clients (client.vectorize, fedrun/fl/vectorized.py): groups, per-client clipping,
the task's loss split, a group's training against one-by-one training, and refused configs.

The training comparisons use the tests' tiny U-Net (about 45 k parameters, 8x8 images) and take
a few seconds."""

import numpy as np
import pytest
import torch

from fedrun.errors import ConfigError
from fedrun.fl.local import batch_indices, client_generator, train_client
from fedrun.fl.vectorized import (GroupTrainer, clip_per_client_, client_groups, deal_groups,
                                  draw_client_steps, stack_steps)


# ---------------------------------------------------------------- groups

def test_groups_hold_clients_of_one_step_count_in_id_order():
    clients, steps = [5, 1, 3, 2, 4, 0], [2, 1, 2, 1, 2, 2]
    assert client_groups(clients, steps, 2) == [[1, 2], [0, 3], [4, 5]]
    assert client_groups(clients, steps, 3) == [[1, 2], [0, 3, 4], [5]]
    assert client_groups(clients, steps, 10) == [[1, 2], [0, 3, 4, 5]]
    with pytest.raises(ValueError):
        client_groups(clients, steps, 0)


@pytest.mark.parametrize("group_size", [1, 2, 3, 5])
def test_groups_are_dealt_whole_and_the_same_at_every_world_size(group_size):
    rng = np.random.default_rng(0)
    clients = sorted(rng.choice(100, size=23, replace=False).tolist())
    steps = rng.integers(1, 4, size=len(clients)).tolist()
    groups = client_groups(clients, steps, group_size)
    cost = dict(zip(clients, steps))
    for world in (1, 2, 3, 4):
        dealt = deal_groups(clients, steps, group_size, world)
        assert sorted(c for mine in dealt for c in mine) == clients
        # what a rank cuts from its clients is exactly the groups it was dealt
        regrouped = [g for mine in dealt for g in client_groups(mine, [cost[c] for c in mine], group_size)]
        assert sorted(regrouped) == sorted(groups)


def test_steps_inputs_stack_per_step_and_refuse_unequal_step_counts():
    a = [{"x": torch.full((2,), 1.0)}, {"x": torch.full((2,), 2.0)}]
    b = [{"x": torch.full((2,), 3.0)}, {"x": torch.full((2,), 4.0)}]
    stacked = stack_steps([a, b])
    assert [s["x"].tolist() for s in stacked] == [[[1.0, 1.0], [3.0, 3.0]], [[2.0, 2.0], [4.0, 4.0]]]
    with pytest.raises(ValueError, match="same number of steps"):
        stack_steps([a, b[:1]])


# ---------------------------------------------------------------- clipping

def test_per_client_clipping_matches_clip_grad_norm_client_by_client():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    grads = [torch.randn(3, *shape, generator=generator) for shape in shapes]
    grads = [g * torch.tensor([10.0, 0.01, 1.0]).view(3, *([1] * len(shape)))
             for g, shape in zip(grads, shapes)]  # client 1 stays below the bound
    expected = []
    for client in range(3):
        own = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
        for p, g in zip(own, grads):
            p.grad = g[client].clone()
        norm = torch.nn.utils.clip_grad_norm_(own, 0.5)
        expected.append((float(norm), [p.grad for p in own]))
    norms = clip_per_client_(grads, 0.5)
    for client, (norm, own) in enumerate(expected):
        assert norms[client].item() == pytest.approx(norm, rel=1e-6)
        for g, e in zip(grads, own):
            torch.testing.assert_close(g[client], e, rtol=1e-6, atol=1e-8)
    assert norms[1] < 0.5  # the client below the bound kept its gradients


# ---------------------------------------------------------------- the loss split

@pytest.fixture
def federation(tiny_config):
    from fedrun.engine import simulator

    def make(*extra):
        return simulator.setup(tiny_config("num_clients=4", "optim.batch_size=2", *extra))

    return make


@pytest.mark.parametrize("draws", [1, 3])
def test_draw_step_then_step_loss_is_the_task_loss_bit_for_bit(federation, draws):
    fed = federation(f"diffusion.noise_draws={draws}")
    run = fed.run
    indices = run.client_indices[1][:2]
    loss = run.task.loss(run.model, indices, client_generator(0, 1, 2))
    inputs = run.task.draw_step(indices, client_generator(0, 1, 2))
    assert inputs["images"].shape[0] == 2 * draws
    assert torch.equal(run.task.step_loss(run.model, inputs), loss)


# A tiny class-conditional DiT (2 blocks of width 32 on 8x8 digits), as in tests/integration/test_dit.py.
DIT = ["task.name=dit", "data.image_size=8", "data.max_samples=240", "num_clients=3",
       "optim.batch_size=4", "optim.lr=1e-3", "dit.class_dropout=0.5", "logging.wandb=false",
       "logging.progress=false"]


@pytest.fixture
def dit_federation(tmp_path):
    from fedrun.config import load_config
    from fedrun.engine import simulator

    def make(*extra):
        return simulator.setup(load_config(None, DIT + [f"output_dir={tmp_path / 'dit'}", *extra]))

    return make


def test_the_dit_loss_splits_too_labels_dropped_from_the_client_stream(dit_federation):
    fed = dit_federation("diffusion.noise_draws=2")
    run = fed.run
    indices = run.client_indices[0][:4]
    loss = run.task.loss(run.model, indices, client_generator(0, 0, 1))
    inputs = run.task.draw_step(indices, client_generator(0, 0, 1))
    assert inputs["class_labels"].shape == (8,) and inputs["images"].shape[0] == 8
    assert torch.equal(run.task.step_loss(run.model, inputs), loss)


# ---------------------------------------------------------------- a group against one by one

def _sequential(fed, clients, steps, global_round=0):
    """Each client trained by fedrun.fl.local.train_client from the global weights: its final
    flat weights and mean loss."""
    run, cfg = fed.run, fed.run.cfg
    weights, losses = [], []
    for client in clients:
        run.params.load_(run.global_weights)
        generator = client_generator(cfg.seed, client, global_round)
        batches = batch_indices(run.client_indices[client], steps, cfg.optim.batch_size, generator)
        result = train_client(run.model, run.params.params, run.task.loss, batches, generator,
                              cfg.optim, run.device)
        weights.append(run.params.flat.clone())
        losses.append(result.mean_loss)
    return torch.stack(weights), losses


def _vectorized(fed, clients, steps, global_round=0):
    run, cfg = fed.run, fed.run.cfg
    trainer = GroupTrainer(run.task.functional_model(run.model), run.params, run.task.step_loss,
                           cfg.optim)
    draws = []
    for client in clients:
        generator = client_generator(cfg.seed, client, global_round)
        batches = batch_indices(run.client_indices[client], steps, cfg.optim.batch_size, generator)
        draws.append(draw_client_steps(run.task.draw_step, batches, generator))
    starts = run.global_weights.expand(len(clients), -1).clone()
    return trainer.train(starts, stack_steps(draws))[:2]


@pytest.mark.parametrize("optimizer", [
    ["optim.name=adamw", "optim.weight_decay=0.01"],
    ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=0.01"],
    ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0", "optim.grad_clip=null"],
])
def test_a_group_trains_like_its_clients_one_by_one(federation, optimizer):
    """Four clients, three steps each, with gradient clipping at 0.05 (binding for most steps)
    unless switched off: the weights and losses of the group equal one-by-one training up to
    fp32 rounding. AdamW turns a rounding-level difference of a near-zero gradient coordinate
    into a step of up to lr, so its check is on the whole update, not coordinate by coordinate."""
    clip = [] if "optim.grad_clip=null" in optimizer else ["optim.grad_clip=0.05"]
    fed = federation(*optimizer, *clip)
    clients, steps = [0, 1, 2, 3], 3
    global_weights = fed.run.global_weights.clone()
    sequential, sequential_losses = _sequential(fed, clients, steps)
    vectorized, vectorized_losses = _vectorized(fed, clients, steps)
    assert torch.equal(fed.run.global_weights, global_weights)
    update = sequential - global_weights
    assert update.abs().max() > 1e-3  # the clients really trained
    difference = float((vectorized - sequential).norm() / update.norm())
    print(f"{optimizer[0]}: relative difference of the updates {difference:.2e}, "
          f"max |dw| {float((vectorized - sequential).abs().max()):.2e}")
    if "optim.name=sgd" in optimizer:
        torch.testing.assert_close(vectorized, sequential, rtol=0, atol=2e-6)
        assert difference < 1e-4
    else:
        assert difference < 5e-3
    assert vectorized_losses == pytest.approx(sequential_losses, rel=1e-4)


def test_a_dit_group_trains_like_its_clients_one_by_one(dit_federation):
    fed = dit_federation("optim.name=sgd", "optim.lr=0.05", "dit.class_dropout=0.5")
    global_weights = fed.run.global_weights.clone()
    sequential, sequential_losses = _sequential(fed, [0, 1, 2], 2)
    vectorized, vectorized_losses = _vectorized(fed, [0, 1, 2], 2)
    update = sequential - global_weights
    assert update.abs().max() > 1e-3
    assert float((vectorized - sequential).norm() / update.norm()) < 1e-4
    assert vectorized_losses == pytest.approx(sequential_losses, rel=1e-4)


def test_clients_of_a_group_do_not_affect_each_other(federation):
    """A client's result does not depend on which clients share its group (up to rounding:
    the batched kernels may sum in another order). A group of one also checks that strided
    gradients (vmap returns some for one client) do not upset torch's fused optimizer."""
    fed = federation("optim.name=sgd", "optim.lr=0.05")
    pair, _ = _vectorized(fed, [1, 2], 2)
    alone, _ = _vectorized(fed, [2], 2)
    torch.testing.assert_close(pair[1], alone[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("form", ["proximal", "offset"])
def test_a_group_adds_each_clients_gradient_term_as_the_hook_does(federation, form):
    """FedProx's mu (w - w_global) and SCAFFOLD's per-client offset c - c_i, added by the group
    trainer to the stacked gradients, give one-by-one training with the term's gradient hook up
    to fp32 rounding; and the term changes the result by far more than that rounding."""
    from fedrun.fl.clients import GradTerm

    fed = federation("optim.name=sgd", "optim.lr=0.05", "optim.momentum=0", "optim.grad_clip=null")
    run, cfg = fed.run, fed.run.cfg
    clients, steps, gw = [0, 1, 2], 3, fed.run.global_weights
    if form == "proximal":  # a large mu, so that 3 small steps away from w_global matter
        terms = [GradTerm(mu=5.0, anchor=gw) for _ in clients]
    else:
        terms = [GradTerm(offset=0.01 * torch.randn(gw.shape, generator=torch.Generator().manual_seed(c)))
                 for c in clients]
    if form == "proximal":  # the anchor term is zero at the first step: start the clients elsewhere
        starts = gw + 0.01 * torch.randn(len(clients), gw.numel(), generator=torch.Generator().manual_seed(9))
    else:
        starts = gw.expand(len(clients), -1).clone()
    sequential, draws = [], []
    for row, (client, term) in enumerate(zip(clients, terms)):
        run.params.load_(starts[row])
        generator = client_generator(cfg.seed, client, 0)
        batches = batch_indices(run.client_indices[client], steps, cfg.optim.batch_size, generator)
        train_client(run.model, run.params.params, run.task.loss, batches, generator, cfg.optim,
                     run.device, grad_hook=term.hook(run.params.params))
        sequential.append(run.params.flat.clone())
        generator = client_generator(cfg.seed, client, 0)
        batches = batch_indices(run.client_indices[client], steps, cfg.optim.batch_size, generator)
        draws.append(draw_client_steps(run.task.draw_step, batches, generator))
    sequential = torch.stack(sequential)
    trainer = GroupTrainer(run.task.functional_model(run.model), run.params, run.task.step_loss, cfg.optim)
    with_terms, _, _ = trainer.train(starts, stack_steps(draws), terms)
    without, _, _ = trainer.train(starts, stack_steps(draws))
    rounding = float((with_terms - sequential).norm())
    effect = float((with_terms - without).norm())
    print(f"{form}: |vectorized - one by one| {rounding:.2e}, the term's effect {effect:.2e}")
    torch.testing.assert_close(with_terms, sequential, rtol=0, atol=2e-6)
    assert effect > 1e-3 and effect > 1000 * rounding


def test_stateful_clients_continue_their_own_adamw_state_in_a_group(federation):
    """client.stateful_optimizer: one client continuing the AdamW state of 3 earlier steps and
    two fresh ones, in one group: weights and kept states equal one-by-one training with torch's
    AdamW continued from the same states up to fp32 rounding, the step counts exactly; and the
    continued state changes the continuing client's result by far more than that rounding."""
    fed = federation("optim.name=adamw", "optim.weight_decay=0.01", "optim.grad_clip=0.05")
    run, cfg = fed.run, fed.run.cfg
    gw = run.global_weights.clone()

    def batches(client, count, global_round):
        generator = client_generator(cfg.seed, client, global_round)
        return generator, batch_indices(run.client_indices[client], count, cfg.optim.batch_size, generator)

    run.params.load_(gw)
    generator, rows = batches(0, 3, 0)  # round 0: client 0 trains 3 steps, keeping its state
    earlier = train_client(run.model, run.params.params, run.task.loss, rows, generator, cfg.optim,
                           run.device, keep_optimizer=True).state
    clients, states = [0, 1, 2], [earlier, None, None]
    sequential, kept_sequential, draws = [], [], []
    for client, state in zip(clients, states):  # round 1: 2 steps each
        run.params.load_(gw)
        generator, rows = batches(client, 2, 1)
        result = train_client(run.model, run.params.params, run.task.loss, rows, generator,
                              cfg.optim, run.device, optimizer_in=state, keep_optimizer=True)
        sequential.append(run.params.flat.clone())
        kept_sequential.append(result.state)
        generator, rows = batches(client, 2, 1)
        draws.append(draw_client_steps(run.task.draw_step, rows, generator))
    sequential = torch.stack(sequential)
    trainer = GroupTrainer(run.task.functional_model(run.model), run.params, run.task.step_loss, cfg.optim)
    starts = gw.expand(len(clients), -1).clone()
    vectorized, _, kept = trainer.train(starts, stack_steps(draws), None, states)
    update = sequential - gw
    difference = float((vectorized - sequential).norm() / update.norm())
    assert update.abs().max() > 1e-3 and difference < 5e-3
    assert [float(k["optim.step"]) for k in kept] == [float(k["optim.step"]) for k in kept_sequential] == [5.0, 2.0, 2.0]
    for mine, theirs in zip(kept, kept_sequential):
        for key in ("optim.exp_avg", "optim.exp_avg_sq"):
            assert float((mine[key] - theirs[key]).norm() / theirs[key].norm()) < 5e-3, key
    fresh, _, _ = trainer.train(starts, stack_steps(draws), None, [None, None, None])
    effect = float((fresh[0] - vectorized[0]).norm() / update[0].norm())
    print(f"stateful: relative difference {difference:.2e}, the continued state's effect {effect:.2e}")
    assert effect > 20 * difference and torch.equal(fresh[1:], vectorized[1:])


def test_a_group_refuses_clients_whose_terms_differ_in_form(federation):
    from fedrun.fl.clients import GradTerm

    fed = federation()
    run = fed.run
    trainer = GroupTrainer(run.task.functional_model(run.model), run.params, run.task.step_loss, run.cfg.optim)
    gw = run.global_weights
    with pytest.raises(ValueError, match="one form"):
        trainer.train(gw.expand(2, -1).clone(), [], [GradTerm(mu=1.0, anchor=gw), None])


# ---------------------------------------------------------------- refused configs

@pytest.mark.parametrize("overrides, says", [
    (["client.vectorize=-1"], "must be >= 0"),
    (["client.algorithm=toy_visits"], "client algorithm 'toy_visits'"),  # its own train
    (["client.stateful_optimizer=true", "optim.name=sgd", "optim.momentum=0.9"], "optim.momentum=0"),
    (["precision=bf16"], "precision=fp32"),
])
def test_combinations_vectorized_clients_cannot_run_are_refused(overrides, says):
    import toy_algorithms  # noqa: F401  (registers toy_visits, a client algorithm with its own train)
    from fedrun.config import load_config

    with pytest.raises(ConfigError, match="client.vectorize") as error:
        load_config(None, ["client.vectorize=4", *overrides])
    assert says in str(error.value)


def test_a_fine_tuning_task_refuses_vectorized_clients():
    from fedrun.config import load_config

    with pytest.raises(ConfigError, match="config key 'client.vectorize': task 'sd_lora'"):
        load_config(None, ["task.name=sd_lora", "finetune.pretrained=base",
                           "finetune.instance_prompt=a photo", "data.name=image_folder",
                           "data.root=photos", "client.vectorize=2"])


def test_vectorize_off_is_the_default():
    from fedrun.config import load_config

    assert load_config(None, []).client.vectorize == 0
