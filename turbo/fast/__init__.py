"""The fast path: the same images as the plain generator, sooner.

`path` (FastPath: folding, the prepared forward), `exact_fold` (folding deltas in place and restoring
the base bit for bit), `subpixel` (the decoder's upsamplers as sub-pixel convs), `cuda_graph`,
`group_norm` (CUDA GroupNorm as reductions that fill the GPU), `bench` (the benchmark).
Nothing in `turbo` below this package imports it except the pipeline.
"""
