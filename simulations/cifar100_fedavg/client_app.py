"""ClientApp: fl_unlearn's message handlers over this client's partition (see strategies.client)."""

from strategies.app import make_client_app

app = make_client_app()
