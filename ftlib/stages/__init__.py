"""Layer 3, stages: one module per pipeline stage (validate, split, train, evaluate, benchmark,
quantize, merge, review, distill, prune). May import core and serving, and each other."""
