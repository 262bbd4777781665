"""The applications around the psi_cuda library: the command line (``psi-cuda``, ``python -m
psi_cuda``), training runs, the step benchmark, plots and the built-in digits data.

They use the library (psi_cuda.ops, optim, bnp, groups) like any other program would;
``import psi_cuda`` does not import them. Their extra needs (tqdm for the progress bar,
matplotlib for the plots) are the ``apps`` extra.
"""
