"""Client-level differential privacy: DP-FedAvg's transforms, its accountants (RDP, PLD),
adaptive clipping and the pre-flight check."""
