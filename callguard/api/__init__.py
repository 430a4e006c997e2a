"""The HTTP API and the live console (`callguard api`)."""
