"""Operating: logs, trace, metrics and health, alerts, the admin socket and the diagnostics.

The stages never import this package: they publish events (mailgate.events) and ops subscribes."""
