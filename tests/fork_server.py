"""Runs ``python -m MODULE ARGS`` for the tests as forks of one process that imported torch, accelerate and
cardinal once, so a command costs its own work and not an interpreter start plus about 4 s of imports.

    python tests/fork_server.py    # then one JSON request per line on stdin, one JSON reply per line on stdout

A request is ``{"module", "argv", "env", "cwd", "stdout", "stderr", "timeout"}``. The child takes that
environment and working directory, sends its two streams to the two files, runs the module as ``python -m``
does (``runpy`` as ``__main__``, the exit handlers at the end) and exits with its code; the reply is
``{"code": N}``, negative for a signal (``-SIGALRM`` when ``timeout`` ran out). Nothing here runs a torch
operation before forking: a child must start with no thread pool, no Accelerate state and no seeded RNG of
another command. Settings read when the interpreter starts (``PYTHONWARNINGS``, thread counts of the math
libraries) are this process's: commands that change them need a real interpreter (``conftest.cli``). Every
child also shares this process's string hash seed.
"""

import atexit
import json
import os
import runpy
import signal
import sys
import threading
import traceback

# imported once, here, for every child: torch imports torch._dynamo on a run's first FLOP count or optimizer
# step, and the compiler (with networkx) when a run compiles
import accelerate  # noqa: F401
import torch
import torch._dynamo
import torch._inductor.compile_fx  # noqa: F401

import cardinal.export
import cardinal.summary
import cardinal.train  # noqa: F401


def child(request: dict) -> int:
    """The command's exit code, as the interpreter would give it."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()  # as ``python -m`` puts it, not this file's folder
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    signal.alarm(max(1, round(request["timeout"])))
    sys.argv = [request["module"], *request["argv"]]
    if not hasattr(sys.modules.get(request["module"]), "__path__"):  # a module, not a package (its __main__ runs)
        sys.modules.pop(request["module"], None)  # runs as __main__ only, and is imported anew if imported
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # what an interpreter does at exit: wait for threads that are not daemons, then
    atexit._run_exitfuncs()  # run the exit handlers
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve(requests, replies) -> None:
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            os._exit(child(request))
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    replies = os.fdopen(os.dup(1), "w")  # the children's fd 1 is their own stdout file, never this pipe
    os.dup2(2, 1)
    serve(sys.stdin, replies)
