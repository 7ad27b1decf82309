"""The *execute* stage: scenarios in, observations out, on real ranks.

``executor`` is the one implementation of running a scenario (torch and the
standard library only); ``pool`` keeps its ranks alive across scenarios,
``spawn`` starts fresh ones, ``reference`` computes what a single process
gets, and ``observe`` turns the executor's reports into ``Observations``.
"""
