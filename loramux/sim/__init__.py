"""loramux's simulator: the real control plane on a virtual clock, with a cost-model executor (issue 11)."""
