"""How the energy-based networks learn: the learning rules of ``--alg`` (``estimators``: the
``Estimator`` base, EP and BPTT; ``recurrent_backprop``: RBP; ``clamped_learning``: CL and CpL),
their registry (``registry``), the losses on the output units (``losses``) and a run's training
sums (``metrics``)."""
