"""The *execute* stage: scenarios in, observations out, on real ranks.

In a rank: ``model`` builds the scenario's model and runs the user's
forwards, ``engines`` wraps it (one module per engine), ``trace`` records
every collective and the unit it served, ``groups`` creates the scenario's
process groups, and ``rank`` runs the steps and reports each outcome in the
words of ``protocol``. In the parent: ``collect`` gathers the reports and
recognises deadlocks, ``pool`` keeps ranks alive across scenarios, ``spawn``
starts fresh ones, ``reference`` computes what a single process gets, and
``observe`` turns the reports into ``Observations``. ``devices`` places the
ranks on the CPU or GPUs. Everything a rank runs needs only torch and the
standard library.
"""
