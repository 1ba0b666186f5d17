"""Gesture service: the two partners of a couple send each other gestures in real time."""
