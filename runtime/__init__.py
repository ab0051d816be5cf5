"""Layer 5, the runtime: everything a run needs between the rules and a socket, for both sides.

* ``runtime.setup``: what each side derives from the run's configuration (problem, rules, x^0).
* ``runtime.protocol``: the frames around every message (kinds, header, version) and their parser.
* ``runtime.transport``: the one place where ZeroMQ sockets are made and configured.
* ``runtime.server_core`` / ``runtime.worker_core``: one round on each side, independent of sockets.
* ``runtime.engine``: the in-process engine (the same cores, the same wire format, one process).
* ``runtime.metrics`` / ``runtime.progress``: the metrics file and the progress display.

``psserver/`` (the ROUTER loop) and ``worker/`` (the DEALER loop) sit on top and never import each
other; ``psc`` (the command line) sits on top of both.
"""
