"""The second stage after Hypothesis: a reducer that knows scenarios
(``reducer``), its simplifications (``passes``) and what it leaves with a
finding (``record``), as C-Reduce follows Csmith. ``record`` is plain data
the corpus reads; ``reducer`` runs live ranks."""
