"""Pieces shared by every kernel: dispatch, validation, padding, numerics (compute dtype,
float32-accumulating dot, soft cap, softplus, SiLU), segments (block ranges, run ids), tiles
(TPU lane layout), testing helpers."""
