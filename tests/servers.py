"""The fault doubles the tests use (they live in the package, shared with bench/)."""

from callguard.simulator.faults import Proxy, RedisServer, answers, bindable, free_port

__all__ = ["Proxy", "RedisServer", "answers", "bindable", "free_port"]
