"""`loramux bench`: workloads, baselines, runs and reports. Import submodules directly."""
