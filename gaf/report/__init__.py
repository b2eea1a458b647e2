"""The results pipeline: run directories -> result files -> figures and tables.

``gaf.report.collect`` gathers run directories into results/<experiment>/{runs,curves,evals}.csv
and provenance.json; ``gaf.report.data`` is the one loader of those files; ``gaf.report.tables``
and ``gaf.report.figures`` make the tables and figures from them (``gaf.report.plot``: the
figures' style and drawing, the one module that imports matplotlib); ``gaf.report.regenerate``
writes them all, redrawing only the figures whose inputs changed. scripts/collect.py and
scripts/plot.py are their command lines (``make figures``).

Importing this package imports nothing: collect needs neither matplotlib nor Hydra (a lent GPU
without them collects its runs).
"""
