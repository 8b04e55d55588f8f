"""Experiments made of many runs, and the runner they share.

* ``steps``: a step (``RunSpec``: a fedrun verb or a custom function, its run directory, its
  dependencies, when it is finished), its ``Outcome`` and the record it leaves;
* ``runner``: ``execute(plan, jobs, backend)``, inline, as processes, or on Slurm (``slurm``);
* ``fedrun compare``: ``grid`` (the grid file, typed, and its plan) -> ``tuning`` (the tuning
  runs and the choice per method and budget, when the grid has a tuning section) -> ``runner``
  -> ``collect`` -> ``stats`` (paired tests, Holm) -> ``tables`` and ``plots`` -> ``compare``
  (the report);
* the scripts' experiments (``scripts.privacy_report``, ``scripts.lora_demo``) are plans of
  steps for the same runner.
"""
