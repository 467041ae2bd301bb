"""fl_unlearn: federated unlearning core (framework-agnostic; never imports flwr)."""
