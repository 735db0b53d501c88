"""esegeta's own explanation methods: the few no installed library ships.

Each method is a function ``fn(call, *, <params>)`` taking an :class:`esegeta.spec.registry.Call`;
its keyword parameters are the config's ``params``. They are registered in
:mod:`esegeta.adapters.own` and, like every adapter, run on the prepared copy of the model.
"""
