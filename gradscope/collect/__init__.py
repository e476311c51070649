"""Collection: hooks on the user's model and optimizer that gather statistics on the device."""

from gradscope.collect.monitor import Monitor

__all__ = ["Monitor"]
