"""`python -m tests.plugins.cli ARGS...`: `ditto ARGS...` with the tests' engines registered (engine.kind=fake),
for the tests that run the CLI as a subprocess. `python -m tests.plugins.cli --module prefect ARGS...` runs
another module's command line the same way (a worker's `prefect flow-run execute`)."""

from __future__ import annotations

import runpy
import sys

from tests.plugins.fake import register_fake_engine

if __name__ == "__main__":
    register_fake_engine()
    if sys.argv[1:2] == ["--module"]:
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        from flows.cli import main

        sys.argv = ["ditto", *sys.argv[1:]]
        main()
