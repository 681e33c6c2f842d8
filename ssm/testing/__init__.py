"""Testing aids shipped with ssm: ``ssm.testing.cudasim``, a CUDA simulator that runs
ssm's GPU backend and its CUDA kernels on the CPU."""
