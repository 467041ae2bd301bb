"""ServerApp: federated training with lineage tracking, then FIUn unlearning (see strategies.experiment)."""

from strategies.app import make_server_app

app = make_server_app()
