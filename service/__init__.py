"""Gesture service: the two partners of a couple send each other gestures in real time."""

# The version when the package runs uninstalled; installed, importlib.metadata has it.
__version__ = "0.1.0"
