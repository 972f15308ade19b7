"""The service: the daemon (APScheduler wiring, signals, sd_notify) and its HTTP server."""
