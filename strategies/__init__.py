"""The Flower layer of fl_unlearn.

- :class:`strategies.server.UnlearningStrategy`: wrap any ``flwr.serverapp`` strategy; lineage, checkpoints,
  ``unlearn(grid, request)``. :class:`strategies.retrain.RetrainStrategy`: the retrain baseline.
- :func:`strategies.client.register_unlearning_handlers` and :class:`strategies.client.ClientSpec`: the client
  handlers; :func:`strategies.mod.unlearning_mod` for legacy ``client_fn`` apps.
- :mod:`strategies.records`: message types and record keys. :mod:`strategies.app`: the App's factories.
"""
