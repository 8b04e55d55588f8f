"""Client-level differential privacy: DP-FedAvg's transforms and its accountant."""
