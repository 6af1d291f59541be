"""What runs the scripts around the engine: their entry (signals, errors, exit statuses), the
typed configurations, data, run folders and records, data-parallel runs and TensorBoard logs.

Nothing here is imported by the package itself: ``experiment.entry`` must load before torch.
"""
