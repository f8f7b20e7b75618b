"""The planted-route benchmark: score vlmflow's readouts against routes known by construction.

:func:`~vlmflow.validation.benchmark.run_validation` runs it (``vlmflow validate``);
:mod:`vlmflow.validation.scores` holds the scores (precision, peak, AUROC) and
:mod:`vlmflow.validation.figure` the figures with the planted bands shaded.
"""
