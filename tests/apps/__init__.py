"""Applications that tests serve with real servers (gunicorn), as a service embedding aggregator would."""
