"""fedrun benchmarks (issue 6): is the simulator almost free compared with the training it simulates?

    python -m bench.run            # full run (~10-15 min on a 2-core CPU), results in docs/benchmarks/
    python -m bench.run --quick    # seconds-scale smoke run (CI), results in runs/bench-quick/

Modules: ``configs`` (the fedrun config overrides each benchmark runs), ``common`` (timing
statistics, machine description, rank-wide maxima),
``local`` (single-process benchmarks: local compute overhead, memory vs virtual clients, the
client state store, accuracy of exact sums), ``worker`` (multi-rank benchmarks under torchrun:
aggregation cost in fp32 and exact mode, an exact-vs-fp32 round of the default job, federated vs
centralized DDP, round-time breakdown of a real ``fedrun train`` run), ``algorithms`` (the
stateful client algorithm the state-store benchmark registers), ``report`` (JSON, markdown, plots).
torch.distributed is used directly here only for the *bare* baselines fedrun is compared with.
"""
