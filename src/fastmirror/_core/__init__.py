"""The compiled core: everything here runs without the GIL on the hot path.

hbitmap  the hierarchical dirty bitmap
blockio  opening, alignment and size discovery, aligned buffers, full
         transfers, flush, zeroing, holes
engine   the copy engine: workers or io_uring drivers picking dirty chunks
"""
