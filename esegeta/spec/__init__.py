"""What is asked: the config schema, requests, the method registry and each method's facts.

Pure description, no computation: nothing here imports an explainer library, runs a model or
writes a file. ``config`` (the JSON schema), ``request`` (one explanation, resolved once),
``registry`` (``MethodSpec`` and ``Library``), ``params``/``values``/``signatures`` (upstream
parameters checked before anything runs), ``cost`` (passes a call needs), ``targets``,
``evaluation`` (the evaluation block's schema), ``validation`` (pydantic errors as JSON paths).
"""
