"""`python -m reflector` is the `reflector` command; in the single binary, also its interpreter.

The privileged helper starts the UDP echo engine as `<python> -m reflector.engines.udp_echo ...`
and its host probe as `<python> -I -c CODE ...`, with `sys.executable` as <python>. In the single
binary that is this program and there is no other interpreter, so it runs those two forms itself.
"""

import sys

if getattr(sys, "frozen", False) and sys.argv[1:2] and sys.argv[1] in ("-I", "-c", "-m"):
    from reflector.frozen_python import run_python_argv

    run_python_argv(sys.argv[1:])
else:
    from reflector.cli import main

    main()
