"""Fork server of the end-to-end tests: `python SCRIPT ARGS` without paying the imports every time.

Importing torch, transformers, peft, bitsandbytes, accelerate and DeepSpeed costs ~8 s of CPU per process,
more than a tiny training run itself. This process imports them once, then reads one JSON request per line
on stdin and answers each with the pid of a forked child that runs the script exactly as the interpreter
runs `python SCRIPT ARGS`: `__name__ == "__main__"`, sys.argv and sys.path[0] set, stdout/stderr sent to
files, an uncaught exception printed as a traceback with exit status 1, `SystemExit("message")` printed
with exit status 1, atexit handlers run. Children are separate processes (their own DeepSpeed/accelerate
state, environment and working directory); the child writes its exit status to `<status>` on the way out.

Request: {"argv": [script, *args], "cwd": str, "env": {str: str}, "stdout": path, "stderr": path,
"status": path, "threads": int}. Nothing is computed here before forking, so no thread pools are running.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import signal
import sys
import traceback


def preload() -> None:
    import deepspeed  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401

    import common.finetune  # noqa: F401  (torch, transformers, peft, bitsandbytes, accelerate, datasets)


def exit_status(code) -> int:
    """What the interpreter makes of `SystemExit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_as_main(request: dict) -> int:
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exit_:
        return exit_status(exit_.code)
    except BaseException:  # noqa: BLE001  (the interpreter's last resort: print and exit 1)
        traceback.print_exc()
        return 1


def child(request: dict) -> None:
    status = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the script's own subprocesses must be waitable
        os.setpgrp()  # a timeout kills the run and everything it started
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(request["cwd"])
        os.environ.update(request.get("env", {}))
        import torch

        torch.set_num_threads(int(request.get("threads", 1)))
        status = run_as_main(request)
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream must not cost the exit status
                stream.flush()
        temporary = request["status"] + ".tmp"
        with open(temporary, "w") as file:
            file.write(str(status))
        os.replace(temporary, request["status"])
        os._exit(status)


def main() -> None:
    # Answers go to the original stdout; whatever the imports print goes to stderr (the launcher's log).
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    print(json.dumps({"ready": os.getpid()}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            child(request)
        print(json.dumps({"pid": pid}), file=answers, flush=True)


if __name__ == "__main__":
    main()
