"""A config's run: plan, execute, write, then evaluate; the one layer that owns "run, then evaluate".

``plan`` (load, prepare, every problem at once), ``executor`` (workers per device, retries),
``job`` (the computation of one (method, inputs) job, shared by both backends), ``writer`` (the
only code that writes into ``output.dir``), ``runner`` (the ``Pipeline`` façade), ``evaluate``
(an evaluation block on a run's saved maps), ``check`` (pre-flight), ``backends`` (Ray).
"""
