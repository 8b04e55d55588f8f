"""fedrun benchmarks (issue 6): is the simulator almost free compared with the training it simulates?

    python -m bench.run            # full run (~6-10 min on a 2-core CPU), results in docs/benchmarks/
    python -m bench.run --quick    # seconds-scale smoke run (CI), results in runs/bench-quick/

Modules: ``configs`` (the fedrun config overrides each benchmark runs), ``common`` (timing
statistics, machine description, rank-wide maxima),
``local`` (single-process benchmarks: local compute overhead, memory vs virtual clients),
``worker`` (multi-rank benchmarks under torchrun: aggregation cost, federated vs centralized DDP,
round-time breakdown of a real ``fedrun train`` run), ``report`` (JSON, markdown, plots).
torch.distributed is used directly here only for the *bare* baselines fedrun is compared with.
"""
