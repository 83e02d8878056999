"""Adaptations of upstream test suites (PyTorch's quantization workflow tests and transformers'
BitNet integration tests) that run the upstream op and lowbit's on the same inputs."""
