//! Torch-compatible CPU noise: mt19937 and torch.randn's Box-Muller layout.
