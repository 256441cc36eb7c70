"""Mixture-of-experts layers: routing, the fused experts (Triton grouped GEMM over
tokens sorted by expert, with a torch reference), and the FusedMoE module."""
