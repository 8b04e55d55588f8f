"""Federated LoRA variants (``finetune.lora_aggregation``: fedsa, hetlora, flexlora, flora) on the
tiny Stable Diffusion pipeline of ``test_finetune.py``: each variant runs once per module (2
rounds, 4 clients of ranks 1, 2, 4, 4 where ranks apply, in-process); the tests check what the
clients trained against what the server made of it, the bytes, and the export in stock diffusers.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_finetune import (_checkpoint, _metrics, assets, finetune_overrides,  # noqa: F401
                           load_into_stock_pipeline)

RANKS = [1, 2, 4, 4]


def _make_recording(cfg):
    """A FinetuneTask that keeps, per round, each accepted client's id, trained vector, weight and
    per-layer product B_k A_k (the replica after training, before the next client)."""
    from fedrun.tasks.sd_lora.lora import lora_layers
    from fedrun.tasks.sd_lora.task import FinetuneTask

    class Recording(FinetuneTask):
        def observe_client(self, run, client, weight, global_round):
            self.names, self.run = list(run.params.names), run
            products = [(layer.b @ layer.a).detach().clone() for layer in lora_layers(run.model)]
            self.trained.setdefault(global_round, []).append(
                (client, run.params.flat.detach().clone(), weight, products))
            super().observe_client(run, client, weight, global_round)

    task = Recording(cfg)
    task.trained = {}
    return task


def _overrides(pipeline, subject, output_dir, variant, *extra):
    ranks = [f"finetune.client_ranks=[{','.join(map(str, RANKS))}]"] if variant != "fedsa" else []
    return finetune_overrides(pipeline, subject, output_dir, f"finetune.lora_aggregation={variant}",
                              *ranks, *extra)


def _run(pipeline, subject, output_dir, variant, *extra):
    from fedrun.config import load_config
    from fedrun.engine import simulator

    cfg = load_config(None, _overrides(pipeline, subject, output_dir, variant, *extra))
    task = _make_recording(cfg)
    simulator.run(cfg, task)
    return Path(output_dir), task


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):  # noqa: F811
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = _run(*assets, tmp_path_factory.mktemp(variant) / "run", variant)
        return cache[variant]

    return get


def _flat(run_dir, done, names):
    weights = _checkpoint(run_dir, done)
    return torch.cat([weights[n].reshape(-1) for n in names])


def _mean(clients):
    """sum n_k v_k / sum n_k of the recorded clients' vectors, float64."""
    total = sum(w for _, _, w, _ in clients)
    return sum(v.double() * w for _, v, w, _ in clients) / total


def _mean_products(clients):
    total = sum(w for _, _, w, _ in clients)
    return [sum(p[i].double() * w for _, _, w, p in clients) / total
            for i in range(len(clients[0][3]))]


def test_fedsa_averages_a_and_keeps_each_clients_b_out_of_the_buffer(runs):
    run_dir, task = runs("fedsa")
    names = task.names
    is_b = torch.cat([torch.full((t.numel(),), ".lora_B." in n)
                      for n, t in ((n, _checkpoint(run_dir, 1)[n]) for n in names)])
    record = _metrics(run_dir)[0]
    assert record["bytes_sent_per_client"] == record["bytes_received_per_client"] \
        == 4 * int((~is_b).sum())
    for done in (1, 2):
        clients = task.trained[done - 1]
        assert len(clients) == 4
        # B never entered the buffer: every update's B part is the global B (its zero init)
        assert all(float(v[is_b].abs().max()) == 0 for _, v, _, _ in clients)
        assert float(_flat(run_dir, done, names)[is_b].abs().max()) == 0
        # A is the weighted mean of the clients' trained A
        assert float((_flat(run_dir, done, names).double() - _mean(clients)).abs().max()) < 1e-6
    # each client's B is its own, in the client state store after each of its rounds
    store = run_dir / "client_state"
    bs = {c: load_file(str(store / f"client_{c:06d}" / "round_00002.safetensors"))["lora_B"]
          for c in range(4)}
    assert all(float(b.abs().max()) > 0 for b in bs.values()) and not torch.equal(bs[0], bs[1])
    first = load_file(str(store / f"client_{0:06d}" / "round_00001.safetensors"))["lora_B"]
    assert not torch.equal(first, bs[0])  # round 2 trained on from it
    # sampled / exported model: shared A with the clients' weighted mean B
    weights = {c: w for c, _, w, _ in task.trained[1]}
    mean_b = sum(bs[c].double() * w for c, w in weights.items()) / sum(weights.values())
    exported = task.variant.export_weights(task.run)
    assert float((exported[is_b].double() - mean_b).abs().max()) < 1e-6
    assert torch.equal(exported[~is_b], _flat(run_dir, 2, names)[~is_b])


def test_hetlora_truncates_down_and_zero_pad_averages_up(runs):
    from fedrun.tasks.sd_lora.lora import lora_layers
    from fedrun.tasks.sd_lora.variants import zero_pad_mean

    run_dir, task = runs("hetlora")
    names = task.names
    for done in (1, 2):
        clients = task.trained[done - 1]
        # the engine's sum over the padded factors is HetLoRA's zero-padded weighted average
        assert float((_flat(run_dir, done, names).double() - _mean(clients)).abs().max()) < 1e-6
    # a rank-1 client held zeros past its rank; by layer, the global equals the reference
    weights = _checkpoint(run_dir, 1)
    a_names = [n for n in names if ".lora_A." in n]
    factors = []
    for client, vector, weight, _ in task.trained[0]:
        offset, state = 0, {}
        for n in names:
            k = weights[n].numel()
            state[n] = vector[offset: offset + k].reshape(weights[n].shape)
            offset += k
        r = RANKS[client]
        assert all(torch.all(state[n][r:] == 0) for n in a_names)
        factors.append((state, weight, r))
    a_name = a_names[0]
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    a, b = zero_pad_mean([(s[a_name][:r], s[b_name][:, :r]) for s, _, r in factors],
                         [w for _, w, _ in factors], rank=4)
    assert float((weights[a_name].double() - a).abs().max()) < 1e-6
    assert float((weights[b_name].double() - b).abs().max()) < 1e-6
    record = _metrics(run_dir)[0]
    per_rank = task.variant.per_rank
    assert record["bytes_round"] == sum(2 * 4 * r * per_rank for r in RANKS)
    assert record["bytes_sent_per_client"] == 4 * per_rank * sum(RANKS) / 4
    assert record["lora_aggregation_error"] > 0
    del lora_layers


def test_flexlora_redistributes_the_truncated_svd_of_the_summed_products(runs):
    from fedrun.tasks.sd_lora.lora import lora_layers

    run_dir, task = runs("flexlora")
    for done in (1, 2):
        delta = _mean_products(task.trained[done - 1])
        weights = _checkpoint(run_dir, done)
        a_names = [n for n in task.names if ".lora_A." in n]
        for a_name, d in zip(a_names, delta):
            a = weights[a_name].double()
            b = weights[a_name.replace(".lora_A.", ".lora_B.")].double()
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            for r in sorted(set(RANKS)):  # what a client of rank r receives
                expected = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
                scale = float(d.abs().max())
                assert float((b[:, :r] @ a[:r] - expected).abs().max()) < 1e-5 * scale
    # the next round's clients started from those truncations: a rank-1 client's product is
    # rank 1 and its factors beyond rank 1 stayed zero
    for client, vector, _, products in task.trained[1]:
        if RANKS[client] == 1:
            assert all(int(torch.linalg.matrix_rank(p)) <= 1 for p in products)
    assert len(lora_layers(task.parts.unet)) == len(delta)


def test_flora_merges_exactly_the_weighted_sum_of_the_clients_products(runs):
    from fedrun.tasks.sd_lora.lora import lora_layers
    from fedrun.tasks.sd_lora.variants import stack_lora

    run_dir, task = runs("flora")
    variant = task.variant
    merged = [torch.zeros_like(m, dtype=torch.float64) for m in variant.merged]
    for done in (1, 2):
        for m, d in zip(merged, _mean_products(task.trained[done - 1])):
            m += d
    for layer, pretrained, m, got in zip(lora_layers(task.parts.unet), variant.pretrained, merged,
                                         variant.merged):
        scale = float(m.abs().max())
        assert scale > 0
        assert float((got.double() - m).abs().max()) < 1e-6 * scale  # fp32 sums of the products
        assert torch.equal(layer.base, pretrained + layer.scale * got)  # merged into the base
    # every round restarts the LoRA: the global factors are the seeded init with B = 0
    assert all(float(t.abs().max()) == 0 for n, t in _checkpoint(run_dir, 2).items() if ".lora_B." in n)
    # stacking the recorded factors reproduces round 1's delta W (rank 1 + 2 + 4 + 4)
    record = _metrics(run_dir)[0]
    per_rank = variant.per_rank
    assert record["bytes_sent_per_client"] == 4 * per_rank * sum(RANKS) / 4
    assert record["bytes_received_per_client"] == 4 * per_rank * sum(RANKS)  # the stacked modules
    clients = task.trained[0]
    layer0 = []
    for client, vector, weight, _ in clients:
        a_name = [n for n in task.names if ".lora_A." in n][0]
        shapes = {n: t.shape for n, t in _checkpoint(run_dir, 1).items()}
        offset = 0
        state = {}
        for n in task.names:
            state[n] = vector[offset: offset + shapes[n].numel()].reshape(shapes[n])
            offset += shapes[n].numel()
        r = RANKS[client]
        layer0.append(((state[a_name][:r].double(),
                        state[a_name.replace(".lora_A.", ".lora_B.")][:, :r].double()), weight))
    a, b = stack_lora([f for f, _ in layer0], [w for _, w in layer0])
    assert a.shape[0] == sum(RANKS)
    expected = _mean_products(clients)[0]
    assert float((b @ a - expected).abs().max()) < 1e-6 * float(expected.abs().max())  # fp32 products


@pytest.mark.parametrize("variant", ["fedsa", "hetlora", "flexlora", "flora"])
def test_export_loads_in_stock_diffusers_and_changes_the_output(runs, assets, variant):  # noqa: F811
    run_dir, task = runs(variant)
    pipe, change = load_into_stock_pipeline(assets[0], run_dir / "final")
    assert change > 1e-5
    loaded = {n.replace(".default_0.", ".default."): p for n, p in pipe.unet.named_parameters()
              if "lora_" in n}
    assert loaded and all(p.shape[0 if ".lora_A." in n else 1] == 4 for n, p in loaded.items())


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["flora", "hetlora", "flexlora", "fedsa"])
def test_one_and_two_processes_give_the_same_variant(assets, tmp_path, variant):  # noqa: F811
    # Three clients: world size 1 sums c0 + c1 + c2, world size 2 sums (c0 + c2) + c1; the
    # update and the products segment are exact sums, the server math runs on the reduced sum.
    ranks = [] if variant == "fedsa" else ["finetune.client_ranks=[1,4,2]"]
    shape = ("num_clients=3", "rounds=2", *ranks, "finetune.aggregation_error_every=0")
    one_dir, _ = _run(*assets, tmp_path / "ws1", variant, *shape)
    proc = run_cli(["finetune", *_overrides(*assets, tmp_path / "ws2", variant, *shape)],
                   torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2" in proc.stderr
    for name in ("final/pytorch_lora_weights.safetensors", "checkpoints/round_00002/model.safetensors"):
        one, two = load_file(str(one_dir / name)), load_file(str(tmp_path / "ws2" / name))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), name
    ws1, ws2 = _metrics(one_dir), _metrics(tmp_path / "ws2")
    assert [r["train_loss"] for r in ws1] == [r["train_loss"] for r in ws2]
    assert [r["bytes_round"] for r in ws1] == [r["bytes_round"] for r in ws2]
