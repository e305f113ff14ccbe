import os

# One BLAS thread: token-by-token generation is bound by memory bandwidth, and on Cloud Run's
# single vCPU extra BLAS threads only fight each other (measured: several times slower).
# Set here, before anything imports NumPy; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
