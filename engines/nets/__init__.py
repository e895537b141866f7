"""Network definitions in plain PyTorch (no torchvision) that upstream checkpoints load into."""
