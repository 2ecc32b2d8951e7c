"""Constants every backend of an op must agree on, defined once here.

The references (modalimmune/ops/) and the Triton kernels (kernels/) import them;
setup.py writes them into the C++/CUDA header ``modalimmune_constants.h`` at build
time, each ``NAME_LIKE_THIS`` as ``constexpr kNameLikeThis``. This file imports
nothing: setup.py reads it without importing the package. Values of one backend
alone (block sizes, thread counts) stay in that backend's file.
"""

# curvature_mask: the histogram of |D| (docs/ops/curvature_mask.md), binned on the float32 bits of |D|
HIST_BINS = 256
HIST_MIN_EXP = -40  # bin b >= 1 starts at 2^(HIST_MIN_EXP + b // 4) (1 + (b % 4) / 4), bin 0 holds all below
HIST_MANTISSA_BITS = 2  # top mantissa bits kept: 4 bins per octave
HIST_SHIFT = 23 - HIST_MANTISSA_BITS  # (float32 bits of |D|) >> HIST_SHIFT: exponent and top mantissa bits
HIST_OFFSET = (127 + HIST_MIN_EXP) << HIST_MANTISSA_BITS  # that value for 2^HIST_MIN_EXP: subtracted, bin 0

# multi-tensor ops (curvature_mask, neumann_update): elements of one tensor per unit of work
# (a Triton program, a CUDA block, an OpenMP job)
CHUNK = 1 << 16
